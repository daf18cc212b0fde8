"""Datasets held in memory as image tensors, nothing fetched from the network.

digits (bundled with scikit-learn) is the default. MNIST, Fashion-MNIST (IDX files, gzipped or not) and
CIFAR-10/100 (the python pickle batches) are read from a local folder in their standard distribution
layouts; any folder of JPEG/PNG images in the class-folder layout (train/<class>/…, test/ or val/) through
imagefolder.py, CIFAR-10 too. Inputs are float32 (N, C, H, W), standardised per channel with the training
set's statistics.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from .extras import require
from .imagefolder import read_image_folder

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_FOLDERS = {"mnist": (".", "MNIST/raw", "mnist"),
               "fashion-mnist": (".", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist", "data/fashion")}
# name: (extracted folder, train batch files, test batch file, label key, classes)
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Dataset:
    """train_inputs (N, C, H, W) float32, train_targets (N,) int64; the same for test."""

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_inputs.shape[1:])


def load_dataset(name: str, data_dir: str | Path | None = None, *, image_size: int | None = None,
                 cache: bool | str | Path = True, progress: bool = False) -> Dataset:
    """One of DATASETS; all but digits and synthetic are read from data_dir.

    image_size, cache and progress apply to image folders (imagefolder, and cifar10 given as a folder):
    resize to image_size (shorter side, then centre crop), where the decoded arrays are cached (True: the
    default folder, False: none, or a folder) and whether decoding shows a progress bar.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name in ("digits", "synthetic"):
        if image_size is not None:
            raise ValueError(f"image_size applies to image folders (imagefolder, cifar10), not {name!r}")
        return load_digits() if name == "digits" else synthetic()
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from a local folder: pass data_dir (--data-dir); "
                         "nothing is downloaded")
    if name == "imagefolder" or (name == "cifar10" and _is_image_folder(name, Path(data_dir))):
        return load_image_folder(data_dir, image_size, cache, progress,
                                 expected_classes=CIFAR10_CLASSES if name == "cifar10" else None, name=name)
    if image_size is not None:
        raise ValueError(f"image_size applies to image folders; the {name} files in {data_dir} have a fixed size")
    if name in IDX_FOLDERS:
        return load_idx_dataset(name, data_dir)
    try:
        return load_cifar(name, data_dir)
    except FileNotFoundError as error:
        if name != "cifar10":
            raise
        raise FileNotFoundError(f"{error}; or give an image folder {Path(data_dir) / 'train'}/<class>/… with "
                                "test/ or val/") from error


def _standardized(name: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                  test_labels: np.ndarray, num_classes: int) -> Dataset:
    """Images (N, C, H, W) of any numeric dtype -> float32 tensors standardised per channel on the train set."""
    train, test = _float32_tensor(train_images), _float32_tensor(test_images)  # fresh, standardised in place
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    train.sub_(mean).div_(std)  # in place: no full-size temporaries (CIFAR-10's train set is 600 MB as float32)
    test.sub_(mean).div_(std)
    return Dataset(name, train, torch.from_numpy(np.asarray(train_labels, dtype=np.int64)),
                   test, torch.from_numpy(np.asarray(test_labels, dtype=np.int64)), num_classes)


def _float32_tensor(images: np.ndarray) -> torch.Tensor:
    """A float32 copy of images in memory that torch allocates: 64-byte aligned, so that a batch sliced from it
    at a multiple of 16 rows starts on a 64-byte boundary as well (numpy's allocations are only 16-byte
    aligned; svp_kernels/train/aligned.py)."""
    images = np.ascontiguousarray(images)
    with warnings.catch_warnings():  # a read-only array (np.frombuffer's) is only read here
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(images)
    return torch.empty(images.shape, dtype=torch.float32).copy_(source)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """sklearn's 1797 8×8 digits, (1, 8, 8); a fixed stratified split (360 test images by default)."""
    datasets = require("sklearn.datasets", "scikit-learn", "the digits dataset (--dataset digits, the default)")
    train_test_split = require("sklearn.model_selection", "scikit-learn", "the digits dataset").train_test_split
    digits = datasets.load_digits()
    images = digits.images[:, None].astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=test_fraction,
                                                        random_state=split_seed, stratify=digits.target)
    return _standardized("digits", train_x, train_y, test_x, test_y, 10)


def synthetic(num_train: int = 2048, num_test: int = 512, input_shape: tuple[int, ...] = (1, 8, 8),
              num_classes: int = 10, noise: float = 2.0, seed: int = 0) -> Dataset:
    """Gaussian classes: one random prototype per class (N(0, 1) per pixel) plus N(0, noise²) per pixel."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *input_shape, generator=generator)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.randint(0, num_classes, (count,), generator=generator)
        return prototypes[targets] + noise * torch.randn(count, *input_shape, generator=generator), targets

    train_x, train_y = sample(num_train)
    test_x, test_y = sample(num_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes)


def batch_indices(num_examples: int, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A shuffled split of range(num_examples) into batches of batch_size; a last batch of one example is
    dropped (BatchNorm cannot train on it) unless it is the only one."""
    batches = list(torch.randperm(num_examples, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


# ----------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------

def load_image_folder(data_dir: str | Path, image_size: int | None = None, cache: bool | str | Path = True,
                      progress: bool = False, expected_classes: tuple[str, ...] | None = None,
                      name: str = "imagefolder") -> Dataset:
    """data_dir/train/<class>/… and data_dir/test/ (or val/), JPEG and PNG (imagefolder.read_image_folder):
    labels follow the sorted class folder names, which must be expected_classes when given."""
    folder = read_image_folder(data_dir, image_size, cache, progress)
    if expected_classes is not None and tuple(folder.classes) != expected_classes:
        unexpected = [cls for cls in folder.classes if cls not in expected_classes]
        missing = [cls for cls in expected_classes if cls not in folder.classes]
        problem = f"class {unexpected[0]!r} is not a {name} class" if unexpected else \
            f"class {missing[0]!r} has no folder"
        raise ValueError(f"{Path(data_dir) / 'train'}: {problem}; {name} as an image folder needs exactly the "
                         f"class folders {', '.join(expected_classes)}")
    return _standardized(name, folder.train_images, folder.train_labels, folder.test_images, folder.test_labels,
                         len(folder.classes))


# ----------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files
# ----------------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic; ValueError if unreadable."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is a corrupt gzip file ({error}); download it again") from error


def read_idx(path: str | Path) -> np.ndarray:
    """An unsigned-byte IDX array (magic 0x0000080N, N big-endian int32 sizes, then the bytes)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic 0x000008NN expected, got {raw[:4].hex()}); "
                         "download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header declares {ndim} dimensions but the file ends early")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise ValueError(f"{path} holds {len(raw) - header} data bytes but its header declares shape {shape} "
                         f"({math.prod(shape)} bytes); the file is truncated or corrupt, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_files(root: Path, folders: tuple[str, ...], names: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Each name (with one of suffixes) from the first folder under root that has it, else FileNotFoundError."""
    found, missing = [], []
    for name in names:
        candidates = [root / folder / f"{name}{suffix}" for folder in folders for suffix in suffixes]
        match = next((path for path in candidates if path.is_file()), None)
        (found if match else missing).append(match or name)
    if missing:
        searched = ", ".join(str(root / folder) for folder in folders)
        raise FileNotFoundError(f"missing {', '.join(map(str, missing))} (expected {', '.join(names)}; "
                                f"searched {searched})")
    return found


def load_idx_dataset(name: str, data_dir: str | Path) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files (optionally .gz): 60000 + 10000 images (1, 28, 28)."""
    paths = _find_files(Path(data_dir), IDX_FOLDERS[name], list(IDX_FILES), ("", ".gz"))
    train_images, train_labels, test_images, test_labels = (read_idx(path) for path in paths)
    for images, labels, image_path in ((train_images, train_labels, paths[0]), (test_images, test_labels, paths[2])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{image_path} and its labels disagree: images {images.shape}, labels {labels.shape}; "
                             "expected (N, H, W) images and (N,) labels")
    if max(train_labels.max(initial=0), test_labels.max(initial=0)) >= 10:
        raise ValueError(f"labels in {paths[1]} / {paths[3]} exceed 9; these are not {name} label files")
    return _standardized(name, train_images[:, None], train_labels, test_images[:, None], test_labels, 10)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: python pickle batches
# ----------------------------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a CIFAR batch never needs anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) from one pickled batch dict {b"data", label_key}."""
    try:
        with path.open("rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"{path} is not a readable CIFAR python batch ({type(error).__name__}: {error}); "
                         "expected a pickled dict with b'data' (N, 3072) uint8 and "
                         f"{label_key!r}; download it again") from error
    if len(images) != len(labels):
        raise ValueError(f"{path} holds {len(images)} images but {len(labels)} labels")
    return images, labels


def _is_image_folder(name: str, root: Path) -> bool:
    """Whether root is read as an image folder: it has train/ and no CIFAR python batch file (the batches win)."""
    folder, train_names, _, _, _ = CIFAR_LAYOUTS[name]
    has_batches = any((root / where / train_names[0]).is_file() for where in (folder, "."))
    return not has_batches and (root / "train").is_dir()


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """CIFAR-10 (cifar-10-batches-py/data_batch_1..5, test_batch) or CIFAR-100 (cifar-100-python/train, test).

    data_dir may be the extracted folder itself or the folder that holds it. CIFAR-100 uses fine labels.
    """
    folder, train_names, test_name, label_key, num_classes = CIFAR_LAYOUTS[name]
    paths = _find_files(Path(data_dir), (folder, "."), train_names + [test_name], ("",))
    batches = [_read_cifar_batch(path, label_key) for path in paths]
    train_images = np.concatenate([images for images, _ in batches[:-1]])
    train_labels = np.concatenate([labels for _, labels in batches[:-1]])
    test_images, test_labels = batches[-1]
    if max(train_labels.max(initial=0), test_labels.max(initial=0)) >= num_classes or \
            min(train_labels.min(initial=0), test_labels.min(initial=0)) < 0:
        raise ValueError(f"labels under {paths[0].parent} fall outside [0, {num_classes}); is this {name}?")
    return _standardized(name, train_images, train_labels, test_images, test_labels, num_classes)

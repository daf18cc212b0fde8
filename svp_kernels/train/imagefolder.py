"""Image folders in the class-folder layout, decoded once through Pillow and cached as plain uint8 arrays.

    root/train/<class>/…/*.jpg|*.jpeg|*.png      (classes: the sorted folder names)
    root/test/<class>/…   (or root/val/<class>/…, used when there is no test/)

Every image becomes (C, H, W) uint8: C = 3 when any image of either split is colour (grayscale ones are
replicated into the three channels), else C = 1; alpha is dropped and 16-bit grayscale is rounded to 8 bits.
Images of mixed sizes need image_size = N: the centred square of side min(H, W) is resized (bilinear,
antialiased) to N × N, which is "shorter side to N, then centre crop". Without image_size every image must
have the first one's size.

Cache: one .npz per (folder, image_size) under cache_dir(), read with allow_pickle=False (it cannot hold
code), holding the decoded arrays and a fingerprint (SHA-256 of the settings and of every image file's
relative path, size and mtime in nanoseconds). Adding, removing, renaming, resizing or touching a file
changes the fingerprint and the folder is decoded again; a cache that is stale, unreadable or malformed is
never used. A file rewritten with the same size and mtime is not noticed: delete the cache file then.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extras import iterate, require

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEST_SPLITS = ("test", "val")
CACHE_ENV = "SVP_KERNELS_CACHE_DIR"
CACHE_OFF = ("off", "none", "0", "false", "no")
CACHE_FORMAT = 1
GRAY_MODES = ("1", "L", "LA")
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La")
ARRAY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


class ImageFolderError(ValueError):
    """A folder or file that cannot be read as an image dataset; the message names it."""


@dataclass
class ImageFolder:
    """Decoded images: train_images (N, C, H, W) uint8, train_labels (N,) int64 in [0, len(classes));
    the same for test. test_split is "test" or "val"; cache_file is where the arrays were read or written
    (None without a cache)."""

    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_split: str
    cache_file: Path | None = None


def cache_dir() -> Path | None:
    """$SVP_KERNELS_CACHE_DIR (off / none / 0 / false / no: no cache), else $XDG_CACHE_HOME/svp_kernels/images,
    else ~/.cache/svp_kernels/images."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in CACHE_OFF + ("",) else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "svp_kernels" / "images"


def cache_file(root: str | Path, image_size: int | None, directory: str | Path) -> Path:
    """The cache of root (resolved) at image_size inside directory: <folder name>-<16 hex digits>.npz."""
    root = Path(root).resolve()
    key = hashlib.sha256(f"{root}\0{image_size}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)[:64] or "root"
    return Path(directory) / f"{name}-{key}.npz"


# ----------------------------------------------------------------------------------------------------
# Listing and fingerprint
# ----------------------------------------------------------------------------------------------------

def _raise_unreadable(error: OSError) -> None:
    raise ImageFolderError(f"{error.filename}: cannot read this folder ({error.strerror or error})") from error


def _subfolders(folder: Path) -> list[str]:
    """The sorted names of folder's non-hidden subfolders."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        _raise_unreadable(error)


def _image_files(folder: Path) -> list[Path]:
    """Every non-hidden .jpg / .jpeg / .png (any case) under folder, recursively, sorted by path."""
    found = []
    for directory, subdirectories, names in os.walk(folder, onerror=_raise_unreadable):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        found += [Path(directory) / name for name in names
                  if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def list_image_folder(root: str | Path) -> tuple[list[str], str, list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(classes, test split name, train (path, label) pairs, test pairs) of root's class-folder layout.

    FileNotFoundError when root/train or both root/test and root/val are missing; ValueError for a train
    class without images, a test split whose classes differ from train's (naming the class), or no test image.
    """
    root = Path(root)
    layout = f"expected {root}/train/<class>/*.jpg|.png and {root}/test/<class>/… (or val/)"
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'} is not a folder ({layout})")
    test_split = next((name for name in TEST_SPLITS if (root / name).is_dir()), None)
    if test_split is None:
        raise FileNotFoundError(f"neither {root / 'test'} nor {root / 'val'} is a folder ({layout})")
    classes = _subfolders(root / "train")
    if not classes:
        raise ImageFolderError(f"{root / 'train'} holds no class folders ({layout})")
    test_classes = _subfolders(root / test_split)
    for name in classes:
        if name not in test_classes:
            raise ImageFolderError(f"class {name!r} of {root / 'train'} has no folder in {root / test_split}; "
                             "both splits need the same class folders")
    for name in test_classes:
        if name not in classes:
            raise ImageFolderError(f"class {name!r} of {root / test_split} has no folder in {root / 'train'}; "
                             "both splits need the same class folders")
    splits = []
    for split in ("train", test_split):
        pairs = []
        for label, name in enumerate(classes):
            files = _image_files(root / split / name)
            if not files and split == "train":
                raise ImageFolderError(f"{root / split / name} holds no .jpg, .jpeg or .png images")
            pairs += [(path, label) for path in files]
        splits.append(pairs)
    if not splits[1]:
        raise ImageFolderError(f"{root / test_split} holds no .jpg, .jpeg or .png images")
    return classes, test_split, splits[0], splits[1]


def fingerprint(root: str | Path, files: list[Path], image_size: int | None) -> str:
    """SHA-256 of the cache format, image_size and every file's path relative to root, size and mtime (ns)."""
    digest = hashlib.sha256(f"svp_kernels images v{CACHE_FORMAT}\0{image_size}\n".encode())
    for path in files:
        try:
            status = path.stat()
        except OSError as error:
            raise ImageFolderError(f"{path}: cannot read this image ({error.strerror or error})") from error
        digest.update(f"{path.relative_to(root).as_posix()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------

def _pillow():
    return require("PIL.Image", "pillow", "reading image folders")


def _to_8bit(image, path: Path):
    """image in mode L (grayscale) or RGB (colour), 8 bits per channel; ValueError for other pixel modes."""
    Image = _pillow()
    if image.mode in GRAY_MODES:
        return image.convert("L")
    if image.mode in SIXTEEN_BIT_GRAY_MODES:  # Pillow's convert("L") would clip 16-bit values at 255
        pixels = np.asarray(image, dtype=np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in COLOUR_MODES:
        return image.convert("RGB")
    raise ImageFolderError(f"{path}: pixel mode {image.mode!r} is not supported (expected 8-bit grayscale or colour, "
                     "or 16-bit grayscale)")


def decode_image(path: Path, image_size: int | None, expected_size: tuple[int, int] | None,
                 first_path: Path | None) -> np.ndarray:
    """One image as (H, W) (grayscale) or (H, W, 3) uint8.

    image_size N: the centred square resized to N × N (JPEGs are first decoded at the smallest DCT scale
    that keeps both sides ≥ N). Without it the image must be expected_size (W, H), the size of first_path.
    """
    Image = _pillow()
    try:
        with Image.open(path) as image:
            if image_size is None:
                if expected_size is not None and image.size != expected_size:
                    raise ImageFolderError(
                        f"images differ in size: {first_path} is {expected_size[0]}×{expected_size[1]}, {path} is "
                        f"{image.size[0]}×{image.size[1]} (width×height); pass --image-size N (image_size=N) to "
                        "resize every image's shorter side to N and centre-crop it to N×N")
                return np.asarray(_to_8bit(image, path))
            image.draft(None, (image_size, image_size))
            image = _to_8bit(image, path)
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            if (width, height) != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR,
                                     box=(left, top, left + side, top + side))
            return np.asarray(image)
    except ImageFolderError:
        raise
    except Exception as error:  # Pillow signals bad files with OSError, SyntaxError, DecompressionBombError, …
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageFolderError(f"{path}: cannot decode this image ({reason})") from error


def decode_images(paths: list[Path], image_size: int | None, progress: bool = False,
                  description: str = "decoding images") -> np.ndarray:
    """(N, C, H, W) uint8 of every path, C = 3 if any image is colour else 1 (see the module docstring)."""
    _pillow()  # a missing Pillow is reported before any progress is shown
    images, gray, expected_size = None, np.zeros(len(paths), dtype=bool), None
    for index, path in enumerate(iterate(paths, desc=description, unit="image", file=sys.stderr,
                                         disable=not progress)):
        pixels = decode_image(path, image_size, expected_size, paths[0])
        if images is None:
            height, width = pixels.shape[:2]
            expected_size = (width, height)
            images = np.empty((len(paths), 3, height, width), dtype=np.uint8)
        if pixels.ndim == 2:
            gray[index] = True
            images[index, 0] = pixels
        else:
            images[index] = pixels.transpose(2, 0, 1)
    if images is None:
        raise ImageFolderError("no images to decode")
    if gray.all():
        return np.ascontiguousarray(images[:, :1])
    images[gray, 1] = images[gray, 0]
    images[gray, 2] = images[gray, 0]
    return images


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------

def _read_cache(path: Path, expected_fingerprint: str, classes: list[str], counts: tuple[int, int]) -> dict | None:
    """The cached arrays if path holds this fingerprint and well-formed arrays, else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if not isinstance(stored, np.lib.npyio.NpzFile):
                return None
            if stored["format"].shape != () or int(stored["format"]) != CACHE_FORMAT or \
                    str(stored["fingerprint"]) != expected_fingerprint or stored["classes"].tolist() != classes:
                return None
            arrays = {key: stored[key] for key in ARRAY_KEYS}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    for split, count in zip(("train", "test"), counts):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) != count \
                or labels.dtype != np.int64 or labels.shape != (count,) or \
                (count and not 0 <= labels.min() <= labels.max() < len(classes)):
            return None
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        return None
    return arrays


def _write_cache(path: Path, arrays: dict, fingerprint_hex: str, classes: list[str]) -> bool:
    """Writes the cache atomically (temporary file, fsync, rename); warns and returns False when it cannot."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, format=np.int64(CACHE_FORMAT), fingerprint=np.str_(fingerprint_hex),
                     classes=np.array(classes, dtype=str), **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        return True
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        warnings.warn(f"could not write the image cache {path} ({error}); the images will be decoded again next "
                      f"time (set {CACHE_ENV} to a writable folder, or to 'off')", stacklevel=3)
        return False


def read_image_folder(root: str | Path, image_size: int | None = None, cache: bool | str | Path = True,
                      progress: bool = False) -> ImageFolder:
    """root's train and test splits as uint8 arrays, from the cache when its fingerprint matches.

    image_size: None (every image must have the same size) or N ≥ 1 (shorter side to N, centre crop N × N).
    cache: True (cache_dir(), which may say no cache), False (none), or a folder.
    Errors: FileNotFoundError for a missing split folder; ValueError naming the file for an unreadable or
    corrupt image, two files of different sizes (without image_size), a class missing from one split.
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be an integer ≥ 1 or None, got {image_size!r}")
    root = Path(root)
    classes, test_split, train, test = list_image_folder(root)
    paths = [path for path, _ in train + test]
    directory = cache_dir() if cache is True else (Path(cache) if cache else None)
    stored = path = key = None
    if directory is not None:
        key = fingerprint(root, paths, image_size)
        path = cache_file(root, image_size, directory)
        stored = _read_cache(path, key, classes, (len(train), len(test)))
    if stored is None:
        images = decode_images(paths, image_size, progress, f"decoding {root}")
        stored = {"train_images": images[:len(train)], "train_labels": np.array([y for _, y in train], np.int64),
                  "test_images": images[len(train):], "test_labels": np.array([y for _, y in test], np.int64)}
        if path is not None and not _write_cache(path, stored, key, classes):
            path = None
        elif path is not None and progress:
            print(f"cached {len(paths)} decoded images in {path} ({CACHE_ENV} chooses the folder, "
                  f"{CACHE_ENV}=off disables it)", file=sys.stderr)
    return ImageFolder(classes, stored["train_images"], stored["train_labels"], stored["test_images"],
                       stored["test_labels"], test_split, path)

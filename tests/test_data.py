"""Dataset loaders on small files written here in each standard layout, including missing and corrupt ones."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from svp_kernels.train.data import batch_indices, load_dataset, load_digits, read_idx, synthetic

RNG = np.random.default_rng(0)
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0x00 0x00 0x08 ndim, big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder, gzipped: bool, train: int = 6, test: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": RNG.integers(0, 256, (train, 28, 28)),
              "train-labels-idx1-ubyte": RNG.integers(0, 10, train),
              "t10k-images-idx3-ubyte": RNG.integers(0, 256, (test, 28, 28)),
              "t10k-labels-idx1-ubyte": RNG.integers(0, 10, test)}
    for name, array in arrays.items():
        data = idx_bytes(array)
        (folder / (name + ".gz" if gzipped else name)).write_bytes(gzip.compress(data) if gzipped else data)
    return arrays


def write_cifar_batch(path, count: int, label_key: bytes, num_classes: int) -> np.ndarray:
    labels = RNG.integers(0, num_classes, count)
    batch = {b"batch_label": b"batch", label_key: labels.tolist(),
             b"data": RNG.integers(0, 256, (count, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * count}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return labels


def test_digits_is_the_embedded_default():
    data = load_dataset("digits")
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train_targets) + len(data.test_targets) == 1797 and len(data.test_targets) == 360
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    assert abs(data.train_inputs.mean().item()) < 1e-4
    assert torch.equal(load_digits().test_targets, data.test_targets)  # the split is fixed


def test_synthetic_is_deterministic_and_shaped():
    first, second = synthetic(num_train=10, num_test=5, input_shape=(3, 4, 4), num_classes=3), synthetic(
        num_train=10, num_test=5, input_shape=(3, 4, 4), num_classes=3)
    assert first.train_inputs.shape == (10, 3, 4, 4) and first.test_targets.shape == (5,)
    assert torch.equal(first.train_inputs, second.train_inputs)


@pytest.mark.parametrize("name, layout", [("mnist", "."), ("mnist", "MNIST/raw"),
                                          ("fashion-mnist", "FashionMNIST/raw"), ("fashion-mnist", "data/fashion")])
@pytest.mark.parametrize("gzipped", [False, True], ids=["raw", "gz"])
def test_idx_datasets_load_from_standard_layouts(tmp_path, name, layout, gzipped):
    arrays = write_idx_dataset(tmp_path / layout, gzipped)
    data = load_dataset(name, tmp_path)
    assert data.train_inputs.shape == (6, 1, 28, 28) and data.test_inputs.shape == (4, 1, 28, 28)
    assert data.train_targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test_targets.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw = torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32)
    assert torch.allclose(data.train_inputs[:, 0], (raw - raw.mean()) / raw.std(), atol=1e-5)


def test_missing_idx_file_is_named(tmp_path):
    write_idx_dataset(tmp_path, gzipped=True)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("corruption, message", [
    (lambda data: b"\x00\x00\x0d\x03" + data[4:], "not an unsigned-byte IDX"),
    (lambda data: data[:-10], "truncated"),
    (lambda data: gzip.compress(data)[:-20], "corrupt gzip"),
    (lambda data: b"", "not an unsigned-byte IDX"),
], ids=["bad-magic", "truncated", "broken-gzip", "empty"])
def test_corrupt_idx_file_raises_value_error(tmp_path, corruption, message):
    write_idx_dataset(tmp_path, gzipped=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corruption(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", tmp_path)


def test_read_idx_round_trips(tmp_path):
    array = RNG.integers(0, 256, (2, 3, 5))
    (tmp_path / "array.idx").write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "array.idx"), array)


def test_idx_label_count_must_match_images(tmp_path):
    write_idx_dataset(tmp_path, gzipped=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3)))
    with pytest.raises(ValueError, match="disagree"):
        load_dataset("mnist", tmp_path)


def write_cifar10(root) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    train = [write_cifar_batch(root / f"data_batch_{i}", 3, b"labels", 10) for i in range(1, 6)]
    return np.concatenate(train), write_cifar_batch(root / "test_batch", 4, b"labels", 10)


@pytest.mark.parametrize("inside", [True, False], ids=["parent-dir", "batches-dir"])
def test_cifar10_loads(tmp_path, inside):
    root = tmp_path / "cifar-10-batches-py"
    train_labels, test_labels = write_cifar10(root)
    data = load_dataset("cifar10", tmp_path if inside else root)
    assert data.train_inputs.shape == (15, 3, 32, 32) and data.test_inputs.shape == (4, 3, 32, 32)
    assert data.train_targets.tolist() == train_labels.tolist() and data.num_classes == 10
    assert data.test_targets.tolist() == test_labels.tolist()


def test_cifar100_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train_labels = write_cifar_batch(root / "train", 5, b"fine_labels", 100)
    write_cifar_batch(root / "test", 3, b"fine_labels", 100)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.train_targets.tolist() == train_labels.tolist()


def test_missing_cifar_batch_is_named(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("content", [
    b"not a pickle at all",
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}),  # no labels
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),  # wrong image size
], ids=["garbage", "no-labels", "wrong-size"])
def test_corrupt_cifar_batch_raises_value_error(tmp_path, content):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root)
    (root / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "executed"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": RunsCode()}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_local_datasets_need_a_folder_and_names_are_checked():
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet", "/tmp")


def test_batch_indices_cover_the_data_and_skip_a_lone_last_example():
    batches = batch_indices(129, 64, torch.Generator().manual_seed(0))
    assert [len(batch) for batch in batches] == [64, 64]
    assert sorted(torch.cat(batch_indices(130, 64)).tolist()) == list(range(130))

"""Image folders (train/<class>/…, test/ or val/) on tiny PNG/JPEG files written here: reading, the cache and
its invalidation, sizes, grayscale and colour, corrupt files, CIFAR-10 as a folder, and svp-train on one."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from svp_kernels.train import imagefolder
from svp_kernels.train.cli import main
from svp_kernels.train.data import CIFAR10_CLASSES, load_dataset
from svp_kernels.train.imagefolder import CACHE_ENV, cache_dir, read_image_folder

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Every test caches under its own tmp folder, never in the user's ~/.cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_image(path, pixels: np.ndarray):
    """pixels (H, W) or (H, W, 3|4) uint8 (or uint16 for 16-bit grayscale) saved as PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def make_folder(root, classes=("dog", "cat"), per_class=(3, 2), size=(4, 4), test_split="test", suffix=".png"):
    """Random RGB images; returns {split: [(pixels (H, W, 3), label)]} in the loader's order."""
    written = {}
    for split, count in zip(("train", test_split), per_class):
        written[split] = []
        for label, name in enumerate(sorted(classes)):
            for index in range(count):
                pixels = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
                write_image(root / split / name / f"{index:02d}{suffix}", pixels)
                written[split].append((pixels, label))
    return written


def test_reads_classes_labels_and_exact_pixels(tmp_path):
    written = make_folder(tmp_path / "d")
    folder = read_image_folder(tmp_path / "d", cache=False)
    assert folder.classes == ["cat", "dog"] and folder.test_split == "test"
    assert folder.train_images.shape == (6, 3, 4, 4) and folder.test_images.shape == (4, 3, 4, 4)
    assert folder.train_images.dtype == np.uint8
    assert folder.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and folder.test_labels.tolist() == [0, 0, 1, 1]
    expected = np.stack([pixels.transpose(2, 0, 1) for pixels, _ in written["train"]])
    assert np.array_equal(folder.train_images, expected)  # PNG is lossless


def test_dataset_is_standardised_with_train_statistics_and_jpeg_and_val_work(tmp_path):
    make_folder(tmp_path / "d", size=(5, 5), test_split="val", suffix=".jpg")
    (tmp_path / "d" / "train" / "cat" / "notes.txt").write_text("ignored")
    data = load_dataset("imagefolder", tmp_path / "d")
    assert data.name == "imagefolder" and data.num_classes == 2 and data.input_shape == (3, 5, 5)
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    assert torch.allclose(data.train_inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.train_inputs.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert len(data.test_targets) == 4


def test_cache_is_written_read_and_invalidated_when_files_change(tmp_path, monkeypatch, cache_in_tmp):
    root = tmp_path / "d"
    make_folder(root)
    first = read_image_folder(root)
    assert first.cache_file is not None and first.cache_file.parent == cache_in_tmp and first.cache_file.exists()
    with np.load(first.cache_file, allow_pickle=False) as stored:  # plain arrays, no pickled objects
        assert all(stored[key].dtype != object for key in stored.files)

    decoded = []
    real_decode = imagefolder.decode_images
    monkeypatch.setattr(imagefolder, "decode_images", lambda paths, *args: decoded.append(len(paths))
                        or real_decode(paths, *args))
    again = read_image_folder(root)
    assert decoded == [] and np.array_equal(again.train_images, first.train_images)

    new_pixels = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    write_image(root / "train" / "cat" / "00.png", new_pixels)
    os.utime(root / "train" / "cat" / "00.png", ns=(1, 1))
    changed = read_image_folder(root)
    assert decoded == [10] and np.array_equal(changed.train_images[0], new_pixels.transpose(2, 0, 1))

    write_image(root / "train" / "dog" / "09.png", new_pixels)  # a new file
    assert read_image_folder(root).train_images.shape[0] == 7 and decoded == [10, 11]
    os.remove(root / "test" / "dog" / "00.png")  # a removed file
    assert read_image_folder(root).test_images.shape[0] == 3 and decoded == [10, 11, 10]
    read_image_folder(root)
    assert decoded == [10, 11, 10]  # the rewritten cache is used again

    resized = read_image_folder(root, image_size=2)  # another setting: its own cache file
    assert resized.cache_file != first.cache_file and resized.train_images.shape[2:] == (2, 2)


@pytest.mark.parametrize("damage", ["garbage", "pickled-object", "short", "float"])
def test_a_damaged_or_foreign_cache_is_never_used_and_cannot_run_code(tmp_path, damage):
    root = tmp_path / "d"
    make_folder(root)
    good = read_image_folder(root)
    marker = tmp_path / "executed"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    with np.load(good.cache_file, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    if damage == "garbage":
        good.cache_file.write_bytes(b"PK\x03\x04 not a zip")
    else:
        if damage == "pickled-object":
            arrays["train_labels"] = np.array([RunsCode()] * 6, dtype=object)
        elif damage == "short":
            arrays["train_images"] = arrays["train_images"][1:]
        else:
            arrays["train_images"] = arrays["train_images"].astype(np.float32)
            arrays["test_images"] = arrays["test_images"].astype(np.float32)
        with open(good.cache_file, "wb") as file:
            np.savez(file, **arrays)
    again = read_image_folder(root)
    assert np.array_equal(again.train_images, good.train_images) and not marker.exists()
    assert again.train_images.dtype == np.uint8
    with np.load(good.cache_file, allow_pickle=False) as stored:  # rewritten with the good arrays
        assert stored["train_labels"].dtype == np.int64


def test_cache_location_and_switching_it_off(tmp_path, monkeypatch):
    root = tmp_path / "d"
    make_folder(root)
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "svp_kernels" / "images"
    assert read_image_folder(root).cache_file.parent == tmp_path / "xdg" / "svp_kernels" / "images"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None and read_image_folder(root).cache_file is None
    assert read_image_folder(root, cache=tmp_path / "mine").cache_file.parent == tmp_path / "mine"
    assert read_image_folder(root, cache=False).cache_file is None


def test_an_unwritable_cache_warns_and_still_loads(tmp_path):
    root = tmp_path / "d"
    make_folder(root)
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the image cache"):
        folder = read_image_folder(root, cache=tmp_path / "file" / "cache")
    assert folder.cache_file is None and folder.train_images.shape == (6, 3, 4, 4)


def test_mixed_sizes_are_refused_naming_two_files_or_resized(tmp_path):
    root = tmp_path / "d"
    make_folder(root)
    tall = np.zeros((8, 4, 3), dtype=np.uint8)
    tall[:2], tall[2:6], tall[6:] = 255, 100, 0  # top, middle, bottom
    write_image(root / "test" / "dog" / "tall.png", tall)
    with pytest.raises(ValueError, match=r"train/cat/00.png is 4×4, .*test/dog/tall.png is 4×8 .*--image-size"):
        read_image_folder(root)
    folder = read_image_folder(root, image_size=4)  # shorter side 4, centre crop 4 × 4: the middle rows
    assert folder.test_images.shape == (5, 3, 4, 4)
    assert (folder.test_images[-1] == 100).all()
    small = read_image_folder(root, image_size=2)
    assert small.train_images.shape == (6, 3, 2, 2) and small.test_images.shape == (5, 3, 2, 2)
    with pytest.raises(ValueError, match="image_size"):
        read_image_folder(root, image_size=0)


def test_grayscale_stays_one_channel_and_a_mix_becomes_rgb(tmp_path):
    gray = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    for split in ("train", "test"):
        write_image(tmp_path / "g" / split / "a" / "0.png", gray)
        write_image(tmp_path / "g" / split / "b" / "0.png", gray // 2)
    only_gray = read_image_folder(tmp_path / "g")
    assert only_gray.train_images.shape == (2, 1, 4, 4) and np.array_equal(only_gray.train_images[0, 0], gray)
    colour = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    write_image(tmp_path / "g" / "train" / "b" / "1.png", colour)
    mixed = read_image_folder(tmp_path / "g")
    assert mixed.train_images.shape == (3, 3, 4, 4) and mixed.test_images.shape == (2, 3, 4, 4)
    assert all(np.array_equal(mixed.train_images[0, channel], gray) for channel in range(3))
    assert np.array_equal(mixed.train_images[2], colour.transpose(2, 0, 1))


def test_alpha_palette_and_16_bit_grayscale_become_8_bit(tmp_path):
    rgba = RNG.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    sixteen = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 … 65535
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    write_image(tmp_path / "m" / "train" / "a" / "rgba.png", rgba)
    write_image(tmp_path / "m" / "train" / "a" / "gray16.png", sixteen)
    palette.save(tmp_path / "m" / "train" / "a" / "palette.png")
    write_image(tmp_path / "m" / "test" / "a" / "rgba.png", rgba)
    folder = read_image_folder(tmp_path / "m")
    gray16, _, rgb = folder.train_images  # sorted names: gray16, palette, rgba
    assert np.array_equal(rgb, rgba[..., :3].transpose(2, 0, 1))
    assert np.array_equal(gray16[0], np.round(sixteen / 257).astype(np.uint8)) and gray16[0, -1, -1] == 255
    assert np.array_equal(gray16[0], gray16[1])


@pytest.mark.parametrize("content", [b"not an image at all", "truncated-jpeg"])
def test_a_corrupt_file_is_named(tmp_path, content):
    root = tmp_path / "d"
    make_folder(root, suffix=".jpg", size=(5, 5))
    bad = root / "train" / "dog" / "01.jpg"
    bad.write_bytes(bad.read_bytes()[:-40] if content == "truncated-jpeg" else content)
    with pytest.raises(ValueError, match=f"{bad}: cannot decode this image"):
        read_image_folder(root)


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "test" / "cat").rename(root / "test" / "cow"), "class 'cat' of .*train has no folder"),
    (lambda root: (root / "test" / "emu").mkdir(), "class 'emu' of .*test has no folder in .*train"),
    (lambda root: [path.unlink() for path in (root / "train" / "dog").iterdir()], "train/dog holds no"),
])
def test_classes_must_match_between_splits(tmp_path, change, message):
    root = tmp_path / "d"
    make_folder(root)
    change(root)
    with pytest.raises(ValueError, match=message):
        read_image_folder(root)


def test_missing_splits_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train is not a folder"):
        read_image_folder(tmp_path)
    make_folder(tmp_path / "d")
    (tmp_path / "d" / "test").rename(tmp_path / "d" / "holdout")
    with pytest.raises(FileNotFoundError, match="neither .*test nor .*val"):
        read_image_folder(tmp_path / "d")


def test_cifar10_as_an_image_folder(tmp_path):
    root = tmp_path / "cifar"
    make_folder(root, classes=CIFAR10_CLASSES, per_class=(1, 1))
    data = load_dataset("cifar10", root)
    assert data.name == "cifar10" and data.num_classes == 10 and data.input_shape == (3, 4, 4)
    assert data.train_targets.tolist() == list(range(10))  # airplane = 0 … truck = 9, CIFAR-10's order
    (root / "train" / "truck").rename(root / "train" / "lorry")
    (root / "test" / "truck").rename(root / "test" / "lorry")
    with pytest.raises(ValueError, match="class 'lorry' is not a cifar10 class"):
        load_dataset("cifar10", root)


def test_cifar10_python_batches_take_precedence_and_size_applies_to_folders_only(tmp_path):
    root = tmp_path / "cifar"
    make_folder(root, classes=CIFAR10_CLASSES, per_class=(1, 1))
    batch = {b"data": RNG.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [3, 4]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(batch))
    assert load_dataset("cifar10", root).input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="image_size applies to image folders"):
        load_dataset("cifar10", root, image_size=8)
    with pytest.raises(ValueError, match="image_size applies to image folders"):
        load_dataset("digits", image_size=8)
    with pytest.raises(FileNotFoundError, match="or give an image folder"):
        load_dataset("cifar10", tmp_path / "empty")


def test_svp_train_runs_on_an_image_folder(tmp_path, capsys):
    root = tmp_path / "d"
    make_folder(root, per_class=(8, 4))
    tiny = ["--dataset", "imagefolder", "--data-dir", str(root), "--model", "mlp", "--width", "16", "--depth", "1",
            "--epochs", "2", "--batch-size", "8", "--no-progress"]
    for method in ("svp", "bp"):
        assert main(tiny + ["--method", method, "--json", str(tmp_path / "run.json")]) == 0
        result = json.loads((tmp_path / "run.json").read_text())
        assert result["config"]["dataset"] == "imagefolder" and len(result["test_accuracy_curve"]) == 2
    write_image(root / "train" / "cat" / "big.png", RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    capsys.readouterr()
    assert main(tiny) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error and "--image-size" in error
    assert "00.png is 4×4" in error and "big.png is 6×6" in error
    assert main(tiny + ["--image-size", "3", "--json", str(tmp_path / "run.json")]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["config"]["image_size"] == 3


def test_svp_train_names_a_corrupt_image_in_one_line(tmp_path, capsys):
    root = tmp_path / "d"
    make_folder(root)
    (root / "test" / "cat" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["--dataset", "imagefolder", "--data-dir", str(root), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("svp-train: error: --data-dir: ") and error.count("\n") == 1
    assert f"{root / 'test' / 'cat' / '00.png'}: cannot decode this image" in error and "Traceback" not in error
    assert main(["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "0", "--no-progress"]) == 2
    assert "--image-size must be ≥ 1" in capsys.readouterr().err

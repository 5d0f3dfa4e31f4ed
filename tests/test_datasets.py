"""Datasets (SPEC 1.6): every on-disk reader against small files written here in the dataset's own format, with
known pixels, so a wrong axis order, channel layout or label offset shows up as a wrong value; plus the error on
missing files, grayscale padding / expansion, resizing, the synthetic shapes and the system Fashion-MNIST.

The files written here are not the originals, so torchvision's md5 checks (CIFAR, SVHN, STL-10) would refuse them:
every test but test_torchvision_md5_check_is_kept accepts any md5 (the files must still exist)."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import common
from common import (
    DATASET_NAMES,
    SYNTHETIC_SHAPES,
    DatasetNotFoundError,
    ImageArray,
    ImageFolderDataset,
    build_dataset,
    fits_on_device,
    synthetic_shapes,
)

REAL_CHECK_MD5 = torchvision.datasets.utils.check_md5


@pytest.fixture(autouse=True)
def accept_any_md5(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda *args, **kwargs: True)


# ---------------------------------------------------------------------------------------------- file writers
# Each writer places pixel values by their byte offset in the file format, written out by hand, rather than by
# reshaping a tensor the way the reader does: a test that shares the reader's reshape would prove nothing.


def planes_rows(pixels: dict, n: int, size: int) -> np.ndarray:
    """CIFAR / Downsampled-ImageNet rows (n, 3*S*S): byte c*S*S + y*S + x is channel c at (y, x).
    pixels: {(i, c, y, x): value}."""
    rows = np.zeros((n, 3 * size * size), dtype=np.uint8)
    for (i, c, y, x), v in pixels.items():
        rows[i, c * size * size + y * size + x] = v
    return rows


def write_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(folder, batches: dict, name: str = "cifar10"):
    """A CIFAR archive's folder: batches {file name: the dict it pickles}, the archive's other files as one black image
    each (torchvision's class insists on all of them), and the meta file. Keys are str: the original's Python 2
    pickles load that way with encoding="latin1"."""
    key, meta, names = ("labels", "batches.meta", "label_names")
    if name == "cifar100":
        key, meta, names = ("fine_labels", "meta", "fine_label_names")
    files = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    for f in files:
        write_pickle(os.path.join(folder, f), batches.get(f, {"data": planes_rows({}, 1, 32), key: [0]}))
    write_pickle(os.path.join(folder, meta), {names: [f"class {i}" for i in range(100)]})


def write_idx(path, array: np.ndarray, gz: bool):
    """IDX: 0, 0, dtype code (0x08 = uint8), ndim; one big-endian uint32 per dim; the bytes."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def write_mnist(folder, prefix: str, n: int, gz: bool) -> np.ndarray:
    """n digits with pixel (y=i, x=2i) = 100 + i and labels 9 - i % 10; returns the labels."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        images[i, i, 2 * i] = 100 + i
    labels = np.array([9 - i % 10 for i in range(n)], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}"), images, gz)
    write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, gz)
    return labels


def write_stl(folder, split: str, pixels: dict, n: int, labels=None):
    """STL-10 binary: each image is 3 x 96 x 96 stored column-major, so byte i*27648 + c*9216 + x*96 + y is channel
    c at (y, x). Labels 1..10 as uint8."""
    raw = np.zeros(n * 3 * 96 * 96, dtype=np.uint8)
    for (i, c, y, x), v in pixels.items():
        raw[i * 27648 + c * 9216 + x * 96 + y] = v
    os.makedirs(folder, exist_ok=True)
    raw.tofile(os.path.join(folder, f"{split}_X.bin"))
    if labels is not None:
        np.asarray(labels, dtype=np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    for other in ("train", "test", "unlabeled"):  # torchvision's class insists on every file of the archive
        if not os.path.exists(os.path.join(folder, f"{other}_X.bin")):
            write_stl(folder, other, {}, 1, labels=None if other == "unlabeled" else [1])  # one black image


def write_png(path, array_hwc: np.ndarray):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array_hwc).save(path)


# ---------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_pixels_labels_and_splits(tmp_path):
    batches = {}
    for b in range(1, 6):  # two images per batch; image 0 of batch b has R = 10 b at (5, 7)
        rows = planes_rows({(0, 0, 5, 7): 10 * b, (1, 1, 0, 31): 200, (1, 2, 31, 0): 50}, 2, 32)
        batches[f"data_batch_{b}"] = {"data": rows, "labels": [b, 9 - b], "batch_label": "x"}
    batches["test_batch"] = {"data": planes_rows({(2, 1, 3, 4): 99}, 3, 32), "labels": [0, 1, 2]}
    write_cifar(str(tmp_path / "cifar-10-batches-py"), batches)

    train = build_dataset("cifar10", root=str(tmp_path))
    assert isinstance(train, ImageArray) and train.name == "cifar10" and train.num_classes == 10
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert train.images[:, 0, 5, 7].tolist() == [10, 0, 20, 0, 30, 0, 40, 0, 50, 0]  # batches in order 1..5
    assert train.images[1, :, 0, 31].tolist() == [0, 200, 0]  # green plane, top right
    assert train.images[1, :, 31, 0].tolist() == [0, 0, 50]  # blue plane, bottom left
    assert int(train.images[1].sum()) == 250  # nothing else is set
    img, label = train[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 8 and isinstance(label, int)

    test = build_dataset("cifar10", root=str(tmp_path), train=False)
    assert test.images.shape == (3, 3, 32, 32) and test.labels.tolist() == [0, 1, 2]
    assert test.images[2, 1, 3, 4] == 99 and int(test.images.sum()) == 99
    assert build_dataset("cifar10", root=str(tmp_path), split="test").labels.tolist() == [0, 1, 2]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    rows = planes_rows({(1, 2, 10, 20): 123}, 2, 32)
    train = {"data": rows, "fine_labels": [99, 42], "coarse_labels": [19, 3]}
    write_cifar(str(folder), {"train": train, "test": {"data": rows[:1], "fine_labels": [7], "coarse_labels": [1]}},
                name="cifar100")  # fmt: skip
    train = build_dataset("cifar100", root=str(tmp_path))
    assert train.num_classes == 100 and train.labels.tolist() == [99, 42]
    assert train.images[1, :, 10, 20].tolist() == [0, 0, 123]
    assert build_dataset("cifar100", root=str(tmp_path), train=False).labels.tolist() == [7]


def test_rgb_to_one_channel_uses_bt601_luma(tmp_path):
    rows = planes_rows({(0, 0, 1, 2): 200, (0, 1, 1, 2): 100, (0, 2, 1, 2): 50}, 1, 32)
    write_cifar(str(tmp_path / "cifar-10-batches-py"), {"test_batch": {"data": rows, "labels": [3]}})
    gray = build_dataset("cifar10", root=str(tmp_path), train=False, channels=1)
    assert gray.images.shape == (1, 1, 32, 32)
    assert gray.images[0, 0, 1, 2] == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # 124.2 -> 124


# ---------------------------------------------------------------------------------------------- SVHN


def test_svhn_mat_layout_label_ten_is_zero_and_splits(tmp_path):
    # scipy is not a requirement (only SVHN's .mat files need it); without it the next test covers the error
    savemat = pytest.importorskip("scipy.io", reason="scipy is optional (SVHN only): pip install scipy").savemat

    def mat(n, labels):
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)  # MATLAB layout: X[y, x, channel, image]
        x[5, 7, 0, 1] = 200
        x[30, 2, 2, 0] = 60
        return {"X": x, "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)}

    os.makedirs(tmp_path / "svhn")
    savemat(str(tmp_path / "svhn" / "train_32x32.mat"), mat(3, [10, 3, 1]))
    savemat(str(tmp_path / "test_32x32.mat"), mat(2, [2, 10]))  # the flat layout torchvision's SVHN writes
    savemat(str(tmp_path / "svhn" / "extra_32x32.mat"), mat(2, [10, 10]))

    train = build_dataset("svhn", root=str(tmp_path))
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8 and train.num_classes == 10
    assert train.labels.tolist() == [0, 3, 1]  # the digit 0 is stored as 10
    assert train.images[1, :, 5, 7].tolist() == [200, 0, 0] and train.images[0, :, 30, 2].tolist() == [0, 0, 60]
    assert int(train.images.sum()) == 260
    assert build_dataset("svhn", root=str(tmp_path), train=False).labels.tolist() == [2, 0]
    assert build_dataset("svhn", root=str(tmp_path), split="extra").labels.tolist() == [0, 0]


def test_svhn_through_torchvision_with_a_stand_in_for_scipy(tmp_path, monkeypatch):
    """The test above needs scipy (not a requirement); this one runs torchvision's SVHN class everywhere, on a stand-in
    scipy.io.loadmat returning what the .mat file holds, to check the layout and labels as they come out of it."""
    import sys
    import types

    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)  # MATLAB layout: X[y, x, channel, image]
    x[5, 7, 0, 1], x[30, 2, 2, 0] = 200, 60
    scipy, scipy_io = types.ModuleType("scipy"), types.ModuleType("scipy.io")
    scipy_io.loadmat = lambda path, **kwargs: {"X": x, "y": np.array([[10], [3], [1]], dtype=np.uint8)}
    scipy.io = scipy_io
    monkeypatch.setitem(sys.modules, "scipy", scipy)
    monkeypatch.setitem(sys.modules, "scipy.io", scipy_io)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # the flat layout torchvision's SVHN writes
    train = build_dataset("svhn", root=str(tmp_path))
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8 and train.num_classes == 10
    assert train.labels.tolist() == [0, 3, 1]  # the digit 0 is stored as 10
    assert train.images[1, :, 5, 7].tolist() == [200, 0, 0] and train.images[0, :, 30, 2].tolist() == [0, 0, 60]
    assert int(train.images.sum()) == 260


def test_svhn_without_scipy_is_a_one_line_error_naming_pip_install_scipy(tmp_path, monkeypatch):
    import builtins

    os.makedirs(tmp_path / "svhn")
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # found, so the reader is called
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(SystemExit) as e, common.usage_errors("simclr.py"):
        build_dataset("svhn", root=str(tmp_path))
    message = str(e.value)
    assert message.startswith("simclr.py: error: ") and "\n" not in message
    assert "pip install scipy" in message and "train_32x32.mat" in message


# ---------------------------------------------------------------------------------------------- STL-10


def test_stl10_column_major_labels_and_unlabeled_splits(tmp_path):
    folder = tmp_path / "stl10_binary"
    write_stl(folder, "train", {(0, 1, 3, 10): 77, (1, 2, 95, 0): 9}, 2, labels=[1, 10])
    write_stl(folder, "test", {(0, 0, 50, 60): 5}, 1, labels=[4])
    write_stl(folder, "unlabeled", {(2, 0, 0, 95): 33}, 3)

    train = build_dataset("stl10", root=str(tmp_path))
    assert train.images.shape == (2, 3, 96, 96) and train.num_classes == 10
    assert train.labels.tolist() == [0, 9]  # files count 1..10
    assert train.images[0, 1, 3, 10] == 77 and train.images[0, 1, 10, 3] == 0  # (y, x), not the stored (x, y)
    assert train.images[1, 2, 95, 0] == 9 and int(train.images.sum()) == 86
    test = build_dataset("stl10", root=str(tmp_path), train=False)
    assert test.labels.tolist() == [3] and test.images[0, 0, 50, 60] == 5

    unlabeled = build_dataset("stl10", root=str(tmp_path), split="unlabeled")
    assert unlabeled.labels.tolist() == [-1, -1, -1] and unlabeled.images[2, 0, 0, 95] == 33
    both = build_dataset("stl10", root=str(tmp_path), split="train+unlabeled")
    assert both.images.shape == (5, 3, 96, 96) and both.labels.tolist() == [0, 9, -1, -1, -1]
    assert both.images[0, 1, 3, 10] == 77 and both.images[4, 0, 0, 95] == 33
    assert not fits_on_device(train)  # 96 px: the DataLoader path


def test_resize_is_antialiased_bilinear_rounded_to_uint8(tmp_path):
    folder = tmp_path / "stl10_binary"
    gen = torch.Generator().manual_seed(0)
    pixels = {(i, c, y, x): int(torch.randint(256, (), generator=gen)) for i in range(2) for c in range(3)
              for y in range(0, 96, 3) for x in range(0, 96, 5)}  # fmt: skip
    write_stl(folder, "test", pixels, 2, labels=[1, 2])
    native = build_dataset("stl10", root=str(tmp_path), train=False)
    small = build_dataset("stl10", root=str(tmp_path), train=False, image_size=32)
    assert small.images.shape == (2, 3, 32, 32) and small.images.dtype == torch.uint8 and small.image_size == 32
    expected = F.interpolate(native.images.float(), size=(32, 32), mode="bilinear", antialias=True)
    assert torch.equal(small.images, expected.round().clamp(0, 255).to(torch.uint8))
    assert fits_on_device(small)


# ---------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("layout,gz", [("MNIST/raw", False), ("mnist", True), ("", True)])
def test_mnist_idx_plain_and_gzipped_in_each_folder(tmp_path, layout, gz):
    folder = os.path.join(tmp_path, layout) if layout else str(tmp_path)
    train_labels = write_mnist(folder, "train", 12, gz)
    write_mnist(folder, "t10k", 3, gz)
    train = build_dataset("mnist", root=str(tmp_path), channels=1)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8 and train.num_classes == 10
    assert train.labels.tolist() == train_labels.tolist()
    assert [int(train.images[i, 0, i, 2 * i]) for i in range(12)] == [100 + i for i in range(12)]
    assert int(train.images.sum()) == sum(100 + i for i in range(12))
    assert len(build_dataset("mnist", root=str(tmp_path), train=False)) == 3


def test_grayscale_expansion_and_28_to_32_padding_are_exact(tmp_path):
    write_mnist(str(tmp_path / "fashion-mnist"), "t10k", 5, gz=True)
    gray = build_dataset("fashion_mnist", root=str(tmp_path), train=False, channels=1)
    rgb = build_dataset("fashion_mnist", root=str(tmp_path), train=False)  # channels=3 by default
    assert rgb.images.shape == (5, 3, 28, 28) and torch.equal(rgb.images, gray.images.expand(-1, 3, -1, -1))
    padded = build_dataset("fashion_mnist", root=str(tmp_path), train=False, image_size=32)
    assert padded.images.shape == (5, 3, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], rgb.images)  # the digit itself is not resampled
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.sum()) == 0  # a 2-pixel black frame
    assert padded.images[3, 1, 3 + 2, 6 + 2] == 103
    resized = build_dataset("fashion_mnist", root=str(tmp_path), train=False, image_size=40, channels=1)
    assert resized.images.shape == (5, 1, 40, 40)  # any other size is a resize, not a pad


def test_idx_rejects_a_file_that_is_not_idx(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist(str(folder), "t10k", 2, gz=False)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x03garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        build_dataset("mnist", root=str(tmp_path), train=False)


# ---------------------------------------------------------------------------------------------- Downsampled ImageNet


@pytest.mark.parametrize("fmt", ["npz", "pickle", "pickle_bytes_keys"])
def test_imagenet32_npz_and_pickle_batches(tmp_path, fmt):
    folder = tmp_path / "imagenet32"
    os.makedirs(folder)

    def write(stem, rows, labels):
        if fmt == "npz":
            np.savez(folder / f"{stem}.npz", data=rows, labels=np.array(labels), mean=np.zeros(3072))
        elif fmt == "pickle":  # the official pickles: a dict with str keys and a list of labels
            write_pickle(str(folder / stem), {"data": rows, "labels": labels, "mean": np.zeros(3072)})
        else:  # copies re-pickled from Python 2 byte strings
            write_pickle(str(folder / stem), {b"data": rows, b"labels": labels, b"mean": np.zeros(3072)})

    for b in range(1, 11):
        write(f"train_data_batch_{b}", planes_rows({(0, b % 3, b, 2 * b): b}, 1, 32), [b * 100])
    write("val_data", planes_rows({(1, 2, 31, 31): 255}, 2, 32), [1, 1000])

    train = build_dataset("imagenet32", root=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and train.num_classes == 1000 and train.name == "imagenet32"
    assert train.labels.tolist() == [b * 100 - 1 for b in range(1, 11)]  # files count 1..1000
    assert [int(train.images[b - 1, b % 3, b, 2 * b]) for b in range(1, 11)] == list(range(1, 11))
    assert int(train.images.sum()) == 55
    val = build_dataset("imagenet32", root=str(tmp_path), train=False)  # default held-out split: val
    assert val.labels.tolist() == [0, 999] and val.images[1, :, 31, 31].tolist() == [0, 0, 255]
    assert fits_on_device(val)
    if fmt != "npz":  # a pickle without the expected entries: one line naming what it found
        write_pickle(str(folder / "val_data"), {"images": planes_rows({}, 1, 32)})
        with pytest.raises(ValueError, match=r"val_data: expected 'data' and 'labels' entries, found \['images'\]"):
            build_dataset("imagenet32", root=str(tmp_path), train=False)


def test_imagenet64_val(tmp_path):
    folder = tmp_path / "imagenet64"
    os.makedirs(folder)
    np.savez(folder / "val_data.npz", data=planes_rows({(0, 0, 63, 40): 7}, 1, 64), labels=np.array([500]))
    val = build_dataset("imagenet64", root=str(tmp_path), split="val")
    assert val.images.shape == (1, 3, 64, 64) and val.images[0, 0, 63, 40] == 7 and val.labels.tolist() == [499]
    assert fits_on_device(val)


# ---------------------------------------------------------------------------------------------- image folders


def test_imagefolder_decodes_uint8_rgb_chw(tmp_path):
    red = np.zeros((6, 5, 3), dtype=np.uint8)
    red[2, 4] = (250, 10, 3)
    write_png(str(tmp_path / "train" / "cat" / "a.png"), red)
    gray = np.full((4, 7), 90, dtype=np.uint8)  # a 1-channel file comes out RGB all the same
    write_png(str(tmp_path / "train" / "dog" / "b.png"), gray)
    write_png(str(tmp_path / "val" / "dog" / "c.png"), red)

    train = build_dataset("imagefolder", root=str(tmp_path))
    assert isinstance(train, ImageFolderDataset) and not isinstance(train, ImageArray)
    assert train.name == "imagefolder" and train.num_classes == 2 and train.classes == ["cat", "dog"]
    img, label = train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 6, 5) and label == 0
    assert img[:, 2, 4].tolist() == [250, 10, 3] and int(img.sum()) == 263
    img, label = train[1]
    assert img.shape == (3, 4, 7) and label == 1 and bool((img == 90).all())
    assert build_dataset("imagefolder", root=str(tmp_path), split="train", channels=1)[0][0].shape == (1, 6, 5)
    val = build_dataset("imagefolder", root=str(tmp_path), train=False)  # default held-out split: val
    assert len(val) == 1 and val.classes == ["dog"]
    assert not fits_on_device(train)
    assert len(pickle.loads(pickle.dumps(train))) == 2  # DataLoader workers can receive it


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name,kwargs,expected_path,hint",
    [
        ("cifar10", {}, "cifar-10-batches-py/{data_batch_1,data_batch_2,", "download=True"),
        ("cifar100", {"train": False}, "cifar-100-python/{train,test,meta}", "download=True"),
        ("svhn", {"split": "extra"}, "svhn/extra_32x32.mat", "download=True"),
        ("stl10", {"split": "unlabeled"}, "stl10_binary/{train_X.bin,train_y.bin,unlabeled_X.bin,", "download=True"),
        ("mnist", {}, "MNIST/raw/{train-images-idx3-ubyte", "download=True"),
        ("fashion_mnist", {"train": False}, "FashionMNIST/raw/{t10k-images-idx3-ubyte", "apt-get install"),
        ("imagenet32", {}, "imagenet32/{train_data_batch_1,train_data_batch_2,", "Downsampled ImageNet"),
        ("imagenet64", {"train": False}, "imagenet64/val_data[.npz]", "image-net.org"),
        ("imagefolder", {}, "train/<class name>/", "layout"),
    ],
)
def test_missing_files_name_the_expected_paths(tmp_path, monkeypatch, name, kwargs, expected_path, hint):
    monkeypatch.setattr(common, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no-system-copy"))
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root=str(tmp_path), **kwargs)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert name in message and os.path.join(str(tmp_path), expected_path) in message and hint in message


def test_partial_files_are_an_error_not_a_smaller_dataset(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(str(folder / "data_batch_1"), {"data": planes_rows({}, 1, 32), "labels": [0]})
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("cifar10", root=str(tmp_path))
    assert "{data_batch_2,data_batch_3,data_batch_4,data_batch_5,test_batch,batches.meta}" in str(err.value)


def test_torchvision_md5_check_is_kept(tmp_path, monkeypatch):
    """Outside these tests torchvision's md5 check stays on: a copy that is not the original is refused in one
    line naming the folder, not read."""
    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", REAL_CHECK_MD5)
    write_cifar(str(tmp_path / "cifar-10-batches-py"), {})
    with pytest.raises(SystemExit) as e, common.usage_errors("simclr.py"):
        build_dataset("cifar10", root=str(tmp_path), train=False)
    message = str(e.value)
    assert "\n" not in message and f"torchvision refused cifar10 under {tmp_path}" in message and "corrupted" in message


def test_download_calls_torchvision_then_reads_the_files(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # stands in for torchvision's class: writes the files where torchvision would, and reads them
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            folder = os.path.join(root, "MNIST", "raw")
            self.targets = torch.tensor(
                write_mnist(folder, "train" if train else "t10k", 4, gz=False), dtype=torch.int64
            )
            self.data = torch.zeros(4, 28, 28, dtype=torch.uint8)
            self.data[torch.arange(4), torch.arange(4), 2 * torch.arange(4)] = 100 + torch.arange(4, dtype=torch.uint8)

    monkeypatch.setattr(common.torchvision.datasets, "MNIST", FakeMNIST)
    ds = build_dataset("mnist", root=str(tmp_path), train=False, download=True)
    assert calls == [(str(tmp_path), False, True)] and len(ds) == 4 and ds.images[2, 0, 2, 4] == 102
    again = build_dataset("mnist", root=str(tmp_path), train=False, download=True)
    assert len(calls) == 1  # files already there: no second download
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)

    def offline(self):
        raise RuntimeError("Error downloading: no network")

    monkeypatch.setattr(common.torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="no network"):
        build_dataset("cifar10", root=str(tmp_path), download=True)


def test_unknown_name_and_split_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_dataset("cifar11")
    assert all(name in str(err.value) for name in DATASET_NAMES)
    with pytest.raises(ValueError, match="train, test, unlabeled, train\\+unlabeled"):
        build_dataset("stl10", split="validation")


def test_image_array_and_fits_on_device():
    ds = ImageArray(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), [0, 1, 2, -1], "x", 3)
    assert ds.labels.dtype == torch.int64 and ds.image_size == 64 and len(ds) == 4 and ds[3][1] == -1
    assert fits_on_device(ds) and not fits_on_device(
        ImageArray(torch.zeros(1, 3, 65, 65, dtype=torch.uint8), [0], "x", 1)
    )
    assert not fits_on_device([(torch.zeros(3, 8, 8), 0)])
    with pytest.raises(ValueError):
        ImageArray(torch.zeros(4, 3, 8, 8), [0, 1, 2, 3], "float images", 4)


# ---------------------------------------------------------------------------------------------- synthetic


def shape_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) synthetic images -> (N, 2): (foreground fraction of the bounding box, box height / width).
    Foreground = pixels far from the corner pixel's color (corners are always background)."""
    diff = (images.float() - images[:, :, :1, :1].float()).abs().amax(1)  # (N, S, S)
    fg = diff > 40  # colors differ by >= 64 per channel, noise std is 8
    rows, cols = fg.any(2).float(), fg.any(1).float()
    h, w = rows.sum(1), cols.sum(1)
    return torch.stack([fg.flatten(1).sum(1) / (h * w), h / w], 1)


def test_synthetic_is_deterministic_balanced_and_labelled_by_shape():
    train = build_dataset("synthetic", synthetic_size=2000)
    again = build_dataset("synthetic", synthetic_size=2000)
    test = build_dataset("synthetic", train=False)
    assert train.name == "synthetic" and train.num_classes == len(SYNTHETIC_SHAPES) == 4
    assert train.images.shape == (2000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 3, 32, 32)  # default test size
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images[:1000], test.images)  # another seed
    assert torch.bincount(train.labels).tolist() == [500] * 4
    assert torch.bincount(synthetic_shapes(10)[1]).tolist() == [3, 3, 2, 2]  # at most one apart
    assert len(set(train.labels[:20].tolist())) > 1  # shuffled, not sorted by class

    # The label is the shape: the box-fill / aspect features of the drawn foreground separate the four classes
    # (disk ~0.79 / 1, square 1 / 1, triangle ~0.5 / 0.8, plus ~0.5 / 1) for a nearest-class-mean rule, whatever the
    # colors, position and size.
    feats, labels = shape_features(train.images), train.labels
    means = torch.stack([feats[labels == k].mean(0) for k in range(4)])
    pred = torch.cdist(shape_features(test.images), means).argmin(1)
    assert (pred == test.labels).float().mean() > 0.9  # 0.97 measured; chance is 0.25
    assert torch.cdist(means, means).add(torch.eye(4)).min() > 0.1  # class means well apart

    # nuisances vary: background colors and shape sizes differ across images of one class
    disks = train.images[train.labels == 0]
    assert disks[:, :, 0, 0].float().std(0).min() > 40
    widths = (disks.float() - disks[:, :, :1, :1].float()).abs().amax(1).gt(40).any(1).sum(1).float()
    assert widths.min() <= 13 and widths.max() >= 19  # half-width r from 0.18 to 0.32 of 32 px


def test_synthetic_size_and_channels():
    ds = build_dataset("synthetic", synthetic_size=40, image_size=48, channels=1)
    assert ds.images.shape == (40, 1, 48, 48) and ds.image_size == 48


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(
    not os.path.isdir(common.FASHION_MNIST_SYSTEM_DIR),
    reason=f"no system Fashion-MNIST at {common.FASHION_MNIST_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_the_debian_package(tmp_path):
    # an empty root: the files can only come from the system package
    train = build_dataset("fashion_mnist", root=str(tmp_path), channels=1)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 10 and torch.bincount(train.labels).tolist() == [6000] * 10
    test = build_dataset("fashion_mnist", root=str(tmp_path), train=False, image_size=32)
    assert test.images.shape == (10000, 3, 32, 32) and torch.bincount(test.labels).tolist() == [1000] * 10
    assert int(test.images[:, :, :2].max()) == 0 and int(test.images[:, :, 2:30, 2:30].float().mean()) > 50

"""Data readers: every format written here by the test, and clean one-line errors for bad files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genforge.train.data import DataError, dynamic_binarize, load_dataset, quantize


def write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> None:
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_digits_splits_are_disjoint_and_seeded() -> None:
    splits = {s: load_dataset("digits", split=s) for s in ("train", "valid", "test")}
    assert splits["train"].images.shape[1:] == (8, 8, 1) and splits["train"].levels == 17
    assert sum(len(d) for d in splits.values()) == 1797
    keys = [{d.images[i].tobytes() + bytes([int(d.labels[i])]) for i in range(len(d))} for d in splits.values()]
    # Duplicated digits exist in the data, so compare sizes of the multiset union instead of exact disjointness.
    assert len(splits["valid"]) == len(splits["test"]) == 180
    assert len(keys[0] | keys[1] | keys[2]) > 1700
    again = load_dataset("digits", split="valid")
    assert np.array_equal(again.images, splits["valid"].images)
    other_seed = load_dataset("digits", split="valid", seed=1)
    assert not np.array_equal(other_seed.images, splits["valid"].images)


@pytest.mark.parametrize("flat", [False, True])
def test_binarized_mnist_npz(tmp_path: Path, flat: bool) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2, (30, 784 if flat else 28, *(() if flat else (28,))), dtype=np.uint8)
    test = rng.integers(0, 2, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", train=train, test=test)
    d = load_dataset("binarized-mnist", split="test", path=tmp_path / "b.npz")
    assert d.images.shape == (5, 28, 28, 1) and d.levels == 2
    assert np.array_equal(d.images[..., 0], test)
    valid = load_dataset("binarized-mnist", split="valid", path=tmp_path / "b.npz")
    tr = load_dataset("binarized-mnist", split="train", path=tmp_path / "b.npz")
    assert len(valid) + len(tr) == 30  # the missing valid split is carved out of train


def test_binarized_mnist_amat_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 2, (3, 784))
    (tmp_path / "binarized_mnist_valid.amat").write_text("\n".join(" ".join(map(str, r)) for r in arr) + "\n")
    d = load_dataset("binarized-mnist", split="valid", path=tmp_path)
    assert np.array_equal(d.images.reshape(3, 784), arr)


def test_binarized_mnist_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", train=np.full((2, 28, 28), 3, dtype=np.uint8))
    with pytest.raises(DataError, match="other than 0 and 1"):
        load_dataset("binarized-mnist", path=tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", train=np.zeros((2, 27, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(2, 27, 28\)"):
        load_dataset("binarized-mnist", path=tmp_path / "shape.npz")
    (tmp_path / "binarized_mnist_train.amat").write_text("0 1 2\n")
    with pytest.raises(DataError, match="line 1 is not 784"):
        load_dataset("binarized-mnist", path=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset("binarized-mnist", path=tmp_path / "missing.npz")
    with pytest.raises(DataError, match="pass --data-path"):
        load_dataset("binarized-mnist")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 40, dtype=np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", imgs, gz=gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", labels, gz=gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs[:4], gz=gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels[:4], gz=gz)
    for name in ("mnist", "fashion-mnist"):
        d = load_dataset(name, split="test", path=tmp_path)
        assert np.array_equal(d.images[..., 0], imgs[:4]) and np.array_equal(d.labels, labels[:4])
    q = load_dataset("mnist", split="train", path=tmp_path, levels=4)
    assert q.levels == 4 and q.images.max() <= 3 and len(q) == 36


def test_idx_errors(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"x")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(DataError, match="promises 3920 bytes"):
        load_dataset("mnist", path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"GIF89a....")
    with pytest.raises(DataError, match="bad magic"):
        load_dataset("mnist", path=tmp_path)


def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    for name in ("data_batch_1", "test_batch"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(6))}, f, protocol=2)
    d = load_dataset("cifar10", split="test", path=tmp_path)
    assert d.images.shape == (6, 32, 32, 3)
    assert np.array_equal(d.images[1, :, :, 0].ravel(), data[1, :1024])  # the red plane comes first


class Boom:
    def __reduce__(self):  # what a hostile pickle does: call a function on load
        return (Path.touch, (Path("/tmp/genforge-pwned"),))


def test_cifar_reader_refuses_code(tmp_path: Path) -> None:
    marker = Path("/tmp/genforge-pwned")
    marker.unlink(missing_ok=True)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Boom(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", path=tmp_path)
    assert not marker.exists()


def test_folder_with_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i, fmt in enumerate(("PNG", "JPEG")):
            arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    d = load_dataset("folder", split="train", path=tmp_path, image_size=8, channels=1)
    assert d.images.shape[1:] == (8, 8, 1) and d.num_classes == 2
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png: not a readable PNG/JPEG"):
        load_dataset("folder", path=tmp_path)


def test_unknown_names() -> None:
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", split="dev")


def test_quantize_and_dynamic_binarize() -> None:
    d = load_dataset("digits")
    q = quantize(d, 2)
    assert set(np.unique(q.images)) <= {0, 1}
    assert np.array_equal(q.images, (d.images >= 9).astype(np.uint8))  # floor(x * 2 / 17)
    with pytest.raises(DataError, match="more levels"):
        quantize(q, 4)
    a = dynamic_binarize(d.images, 17, np.random.default_rng(0))
    b = dynamic_binarize(d.images, 17, np.random.default_rng(0))
    assert np.array_equal(a, b) and set(np.unique(a)) == {0, 1}
    assert abs(a.mean() - d.images.mean() / 16) < 0.01

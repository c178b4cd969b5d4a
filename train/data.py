"""Data sets: local files only, read into memory as uint8 levels (N, H, W, C) with optional labels.

Formats:
- ``digits``: the 8x8 handwritten digits (17 grey levels) that scikit-learn ships as a CSV; read from the
  installed package's data folder without importing scikit-learn.
- ``binarized-mnist``: the static binarization of Larochelle & Murray (2011), from a ``.npz`` with any of
  ``train``/``valid``/``test`` of shape (N, 28, 28) or (N, 784), or from a directory of the original text
  files ``binarized_mnist_{split}.amat`` (one image per line, 784 space-separated 0/1 values).
- ``mnist``, ``fashion-mnist``: the IDX files (``train-images-idx3-ubyte`` etc.), gzipped or not.
- ``cifar10``: the python batches (``data_batch_1..5``, ``test_batch``), unpickled with a loader that
  only admits the few numpy constructors the format uses, so a hostile file cannot run code.
- ``folder``: PNG/JPEG images under a directory (class labels from sub-directory names when there are any),
  resized to ``image_size``.

Splits a data set lacks are carved from its training set with a seeded permutation, and removed from it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .errors import DataError

SPLITS = ("train", "valid", "test")
DATASETS = ("digits", "binarized-mnist", "mnist", "fashion-mnist", "cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageData:
    """Images as integer levels in [0, levels - 1]: uint8 (N, H, W, C); labels int64 (N,) or None."""

    images: np.ndarray
    labels: np.ndarray | None
    levels: int
    num_classes: int = 0
    origin: str = "the data set's own split"  # where the split came from (carved ones say how)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be (N, H, W, C), got shape {self.images.shape}")
        if len(self.images) == 0:
            raise DataError("the data set is empty")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) as the models see it."""
        _, h, w, c = self.images.shape
        return c, h, w

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageData:
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], labels, self.levels, self.num_classes, self.origin)


# ---------------------------------------------------------------- readers of single files


def _open_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): magic 0x0000_08_NDIM, big-endian dims, data."""
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DataError(f"{path}: IDX header promises {count} bytes of data, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_amat(path: Path) -> np.ndarray:
    """The original binarized MNIST text format: one image a line, 784 space-separated 0/1 values."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as ASCII text ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 784 or any(f not in ("0", "1") for f in fields):
            raise DataError(f"{path}: line {lineno} is not 784 space-separated 0/1 values")
        rows.append(np.array(fields, dtype=np.uint8))
    if not rows:
        raise DataError(f"{path}: no images in file")
    return np.stack(rows).reshape(-1, 28, 28)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 python batch contains: numpy arrays and builtin containers."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles store numpy's raw bytes as latin-1 text
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed pickle: the reader must only ever fail cleanly
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected 'data' (N, 3072) and 'labels')")
    if data.dtype != np.uint8:  # a cast would wrap other values into garbage pixels
        raise DataError(f"{path}: CIFAR-10 'data' must be uint8, got {data.dtype}")
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels_arr.size} labels")
    if labels_arr.dtype.kind not in "iu" or (labels_arr.size and not 0 <= labels_arr.min() <= labels_arr.max() <= 9):
        raise DataError(f"{path}: CIFAR-10 labels must be integers in [0, 9]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels_arr.astype(np.int64)


MAX_IMAGE_PIXELS = 1 << 25  # 32 M pixels (a 5,792-pixel square): far above any image these models train on


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: nothing is decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: a {w}x{h} image, more than the {MAX_IMAGE_PIXELS} pixels this reader "
                                "decodes (a decompression bomb?)")
            im = im.convert("RGB" if channels == 3 else "L")
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: more pixels than this reader decodes (a decompression bomb?)") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({type(e).__name__})") from None
    return arr.reshape(size, size, channels)


# ---------------------------------------------------------------- data sets


def _require_path(name: str, path: str | Path | None) -> Path:
    if path is None:
        raise DataError(f"data set {name!r} reads local files: pass --data-path")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory (data set {name!r})")
    return p


def _digits(path: Path | None) -> dict[str, ImageData]:
    if path is None:
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the digits data set ships with scikit-learn, which is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    raw = _open_maybe_gzip(path)
    try:
        table = np.loadtxt(io.StringIO(raw.decode("ascii")), delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, UnicodeDecodeError):  # the reader's message quotes the file: keep it out of ours
        raise DataError(f"{path}: not the digits CSV (65 comma-separated integers a line)") from None
    if table.shape[1] != 65 or table.min() < 0 or table[:, :64].max() > 16:
        raise DataError(f"{path}: not the digits CSV (65 columns, pixel values 0..16)")
    images = table[:, :64].astype(np.uint8).reshape(-1, 8, 8, 1)
    return {"all": ImageData(images, table[:, 64].astype(np.int64), levels=17, num_classes=10)}


def _binarized_mnist(path: Path) -> dict[str, ImageData]:
    out: dict[str, ImageData] = {}
    if path.is_dir():
        for split in SPLITS:
            f = path / f"binarized_mnist_{split}.amat"
            if f.exists():
                out[split] = ImageData(read_amat(f)[..., None], None, levels=2)
        if not out:
            raise DataError(f"{path}: no binarized_mnist_{{train,valid,test}}.amat files in directory")
        return out
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in SPLITS}
    except Exception as e:  # np.load raises many types on foreign bytes
        raise DataError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not arrays:
        raise DataError(f"{path}: the .npz holds none of the arrays {', '.join(SPLITS)}")
    for split, arr in arrays.items():
        if arr.ndim == 2 and arr.shape[1] == 784:
            arr = arr.reshape(-1, 28, 28)
        if arr.ndim != 3 or arr.shape[1:] != (28, 28):
            raise DataError(f"{path}: array {split!r} has shape {arr.shape}, expected (N, 28, 28) or (N, 784)")
        if arr.dtype.kind not in "biuf" or (arr.size and not np.isin(arr, (0, 1)).all()):
            # Grey values, NaN or strings would be cast to 0 by astype(uint8): refuse rather than train on zeros.
            raise DataError(f"{path}: array {split!r} ({arr.dtype}) holds values other than 0 and 1 (static "
                            "binarized MNIST is binary; binarize grey images first)")
        out[split] = ImageData(arr.astype(np.uint8)[..., None], None, levels=2)
    return out


def _find(path: Path, stem: str) -> Path:
    for candidate in (path / stem, path / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{path}: missing {stem} (or {stem}.gz)")


def _idx_dataset(path: Path) -> dict[str, ImageData]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        try:
            img_file = _find(path, f"{prefix}-images-idx3-ubyte")
        except DataError:
            if split == "test":
                continue
            raise
        images = read_idx(img_file)
        if images.ndim != 3:
            raise DataError(f"{img_file}: expected a 3-d image array, got {images.ndim} dimensions")
        labels = read_idx(_find(path, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if labels.shape != (len(images),):
            raise DataError(f"{path}: {len(images)} {split} images but {labels.size} labels")
        out[split] = ImageData(images[..., None], labels, levels=256, num_classes=10)
    return out


def _cifar10(path: Path) -> dict[str, ImageData]:
    batches = [path / f"data_batch_{i}" for i in range(1, 6)]
    train = [read_cifar_batch(b) for b in batches if b.exists()]
    if not train:
        raise DataError(f"{path}: no CIFAR-10 python batches (data_batch_1 .. data_batch_5)")
    out = {
        "train": ImageData(
            np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), 256, 10
        )
    }
    if (path / "test_batch").exists():
        images, labels = read_cifar_batch(path / "test_batch")
        out["test"] = ImageData(images, labels, 256, 10)
    return out


def _folder(path: Path, image_size: int, channels: int) -> dict[str, ImageData]:
    if not path.is_dir():
        raise DataError(f"{path}: the folder data set needs a directory of PNG/JPEG images")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: no .png/.jpg/.jpeg images found")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files})
    labelled = classes != ["."]
    images = np.stack([read_image(p, image_size, channels) for p in files])
    labels = (
        np.array([classes.index(p.parent.relative_to(path).as_posix()) for p in files], dtype=np.int64)
        if labelled
        else None
    )
    return {"train": ImageData(images, labels, 256, len(classes) if labelled else 0)}


def _carve(splits: dict[str, ImageData], seed: int, fraction: float = 0.1) -> dict[str, ImageData]:
    """Fill in the missing splits from the training set with a seeded permutation."""
    if "all" in splits:
        splits = {"train": splits.pop("all"), **splits}
    if "train" not in splits:
        return splits  # nothing to carve from: only the splits present can be asked for
    missing = [s for s in ("valid", "test") if s not in splits]
    if not missing:
        return splits
    base = splits["train"]
    perm = np.random.default_rng(seed).permutation(len(base))
    n_hold = max(1, round(fraction * len(base)))
    if len(base) <= n_hold * len(missing):
        raise DataError(f"the training set ({len(base)} images) is too small to carve {', '.join(missing)} from")
    out = dict(splits)
    for i, split in enumerate(missing):
        out[split] = base.subset(np.sort(perm[i * n_hold : (i + 1) * n_hold]))
        out[split].origin = f"carved from the training set with seed {seed}"
    out["train"] = base.subset(np.sort(perm[len(missing) * n_hold :]))
    out["train"].origin = f"the training set less the carved {' and '.join(missing)} split (seed {seed})"
    return out


def quantize(data: ImageData, levels: int) -> ImageData:
    """Re-quantize levels [0, L-1] to [0, K-1] by equal-width bins (K <= L keeps order and spacing)."""
    if levels == data.levels:
        return data
    if not 2 <= levels <= 256:
        raise DataError(f"levels must be in [2, 256], got {levels}")
    if levels > data.levels:
        raise DataError(f"cannot quantize data with {data.levels} levels to more levels ({levels})")
    q = (data.images.astype(np.int64) * levels) // data.levels
    return ImageData(q.astype(np.uint8), data.labels, levels, data.num_classes, data.origin)


def load_dataset(
    name: str,
    *,
    split: str = "train",
    path: str | Path | None = None,
    levels: int | None = None,
    seed: int = 0,
    image_size: int = 32,
    channels: int = 3,
) -> ImageData:
    """One split of a data set, quantized to ``levels`` when given."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    loaders: dict[str, Callable[[], dict[str, ImageData]]] = {
        "digits": lambda: _digits(None if path is None else _require_path(name, path)),
        "binarized-mnist": lambda: _binarized_mnist(_require_path(name, path)),
        "mnist": lambda: _idx_dataset(_require_path(name, path)),
        "fashion-mnist": lambda: _idx_dataset(_require_path(name, path)),
        "cifar10": lambda: _cifar10(_require_path(name, path)),
        "folder": lambda: _folder(_require_path(name, path), image_size, channels),
    }
    if name not in loaders:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    splits = _carve(loaders[name](), seed)
    if split not in splits:
        raise DataError(f"{path}: data set {name!r} has no {split!r} split here (found {', '.join(splits)})")
    data = splits[split]
    return data if levels is None else quantize(data, levels)


def dynamic_binarize(images: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Bernoulli(intensity) samples of grey images: a fresh binarization each time it is called."""
    p = images.astype(np.float32) / (levels - 1)
    return (rng.random(p.shape, dtype=np.float32) < p).astype(np.uint8)


def binarized_once(data: ImageData, seed: int) -> ImageData:
    """The held-out images of a dynamically binarized model: one Bernoulli draw of each grey image, fixed by
    ``seed``, so every evaluation (each epoch's, gen-eval's) scores the same binary images."""
    if data.levels <= 2:
        return data
    rng = np.random.default_rng([seed, BINARIZE_STREAM])
    return ImageData(dynamic_binarize(data.images, data.levels, rng), data.labels, 2, data.num_classes,
                     f"{data.origin}, binarized once (Bernoulli of the grey levels, seed {seed})")


BINARIZE_STREAM = 0xB1  # keeps the held-out draw apart from the training steps' (seed, step, 1) streams

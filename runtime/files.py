"""Atomic file writes (temp file in the same directory, fsync, rename, fsync of the directory), exclusive
locks on output directories, and PNG grids; torch-free, shared by training, export and sampling."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import LockError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; the renamed file gets the mode an ordinary open() would have given it
    # (0644 under the usual umask), so a service running as another user can read a run or a bundle.
    os.fchmod(fd, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public_dir(path: Path) -> None:
    """Give a directory made by mkdtemp (0700) the mode mkdir would have given it (0755 under the usual umask)."""
    os.chmod(path, 0o777 & ~current_umask())


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


LOCK_FILE = ".genforge.lock"


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if needed) for the block; a second holder
    gets a LockError at once rather than waiting, so two writers never interleave one directory.

    The lock file is never removed: unlinking it while another process has it open would let a third one
    lock a fresh file of the same name, and both would believe they hold the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; writes stay atomic, only the guard is missing
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockError(f"{what} is in use by another genforge process (pid {holder}); wait for it to end") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock, also when the process is killed


def to_display(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 levels in [0, levels - 1] -> uint8 intensities in [0, 255]."""
    if levels == 256:
        return images
    return (images.astype(np.float64) * (255.0 / (levels - 1))).round().astype(np.uint8)


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) -> one (rows * (H + pad) + pad, cols * (W + pad) + pad, C) image."""
    n, h, w, c = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def save_grid(path: str | Path, images: np.ndarray, *, levels: int, nrow: int | None = None, scale: int = 0) -> None:
    """Write a PNG grid; small images are upscaled (nearest) so a grid of 8x8 digits is visible."""
    from PIL import Image

    grid = make_grid(to_display(images, levels), nrow=nrow)
    s = scale or max(1, 256 // max(grid.shape[:2]))
    if s > 1:
        grid = grid.repeat(s, axis=0).repeat(s, axis=1)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")


def save_images(
    path: str | Path, images: np.ndarray, *, levels: int, overwrite: bool = False, nrow: int | None = None
) -> Path:
    """``.png``: a grid; ``.npz``: the raw uint8 array under ``images`` (with ``levels``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(None, "exists", str(path))
    suffix = path.suffix.lower()
    if suffix == ".png":
        save_grid(path, images, levels=levels, nrow=nrow)
    elif suffix == ".npz":
        with atomic_open(path, "wb") as f:
            np.savez(f, images=images, levels=np.int64(levels))
    else:
        raise ValueError(f"{path}: output must end in .png or .npz")
    return path


def read_images_npz(path: str | Path) -> np.ndarray:
    """The uint8 (N, H, W, C) array under ``images`` in a .npz (what gen-sample writes)."""
    from .bundle import BundleError

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise BundleError(f"{path}: a bare .npy array; expected a .npz archive with an 'images' array "
                          "(np.savez(path, images=array), or what gen-sample -o X.npz writes)")
    if not magic.startswith(b"PK"):
        raise BundleError(f"{path}: not a .npz archive (a zip of .npy arrays, as gen-sample -o X.npz writes)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise BundleError(f"{path}: no 'images' array in the .npz (found: {', '.join(z.files) or 'none'})")
            images = z["images"]
    except BundleError:
        raise
    except Exception as e:  # np.load raises many types on foreign bytes
        raise BundleError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if images.ndim != 4 or images.dtype != np.uint8:
        raise BundleError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images

"""Atomic file writes (temp file in the same directory, fsync, rename, fsync of the directory), exclusive
locks on output directories, and PNG grids; torch-free, shared by training, export and sampling."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def aside_name(final: Path, kind: str) -> Path:
    """A hidden sibling of ``final`` for a directory being built (``staging``) or being replaced (``old``);
    ``clean_dead_siblings`` recognises both."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{os.urandom(3).hex()}"


def replace_dir(new: Path, final: Path) -> None:
    """Put the directory ``new`` at ``final``, replacing what is there by renames: a reader sees the old
    directory or the new one, never neither (an atomic exchange where the system has one, else old aside
    then new in), and the old one is deleted only once the new one is in place. An old directory that
    cannot be deleted (a read-only subdirectory, say) is left aside, with a warning naming it."""
    if not final.exists() and not final.is_symlink():
        os.replace(new, final)
        fsync_dir(final.parent)
        return
    if _exchange(new, final):
        old = new  # the exchange left the old directory at the new one's path
    else:
        old = aside_name(final, "old")
        os.replace(final, old)
        try:
            os.replace(new, final)
        except BaseException:
            os.replace(old, final)
            raise
    fsync_dir(final.parent)
    remove_tree(old)


def remove_tree(path: Path) -> None:
    """Delete a directory tree, or warn that (part of) it stayed and where."""
    failures: list[str] = []

    def note(_func: Any, where: str, error: Any) -> None:
        failures.append(f"{where}: {error[1] if isinstance(error, tuple) else error}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=note)
    else:
        shutil.rmtree(path, onerror=note)
    if failures and path.exists():
        warnings.warn(f"the replaced directory was kept at {path} (could not delete {failures[0]})", stacklevel=2)


def clean_dead_siblings(final: Path) -> list[Path]:
    """Remove what killed writers of ``final`` left beside it: a staging directory whose writer is gone
    (its lock is free) and an old directory set aside by a replacement (put back if ``final`` is missing,
    so a kill between the two renames loses nothing). Call it holding ``final``'s writer lock."""
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for p in sorted(final.parent.glob(f".{final.name}.old-*")):
        if not p.is_dir() or p.is_symlink():
            continue
        if final.exists():
            remove_tree(p)
            removed.append(p)
        else:
            os.replace(p, final)
    for p in sorted(final.parent.glob(f".{final.name}.staging-*")):
        if p.is_dir() and not p.is_symlink() and not lock_is_held(p / LOCK_FILE):
            remove_tree(p)
            removed.append(p)
    return removed


def lock_is_held(lock_path: Path) -> bool:
    """Whether a live process holds the advisory lock of ``lock_path`` (False when there is no lock file)."""
    try:
        import fcntl
    except ImportError:
        return True  # cannot tell: never remove
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock just taken, if taken
    return False


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

"""A progress bar on a terminal, plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any


class Progress:
    """``with Progress(total, desc) as p: p.update(n, loss=...)``.

    On a terminal this is a tqdm bar; elsewhere it prints one plain line at most every ``interval`` seconds
    and at the end, so logs stay readable. ``enabled=False`` prints nothing.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, interval: float = 10.0,
                 initial: int = 0) -> None:
        self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
        self.n = initial
        self._initial = initial  # work done before this process started (a resumed run): not in the rate
        self._bar: Any = None
        self._start = self._last = time.monotonic()
        self._postfix: dict[str, Any] = {}
        self._lock = threading.Lock()  # decoding.split_cached_decode updates one bar from several threads
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True, initial=initial)
            except ImportError:  # tqdm is optional for the torch-free runtime
                self._bar = None

    def update(self, n: int = 1, **postfix: Any) -> None:
        with self._lock:
            self._update(n, postfix)

    def _update(self, n: int, postfix: dict[str, Any]) -> None:
        self.n += n
        self._postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.n >= self.total:
            self._last = now
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self._postfix.items())
        done = self.n - self._initial
        left = ""
        if 0 < done and self.n < self.total:  # the remaining time at the rate so far
            left = f", ~{_duration(elapsed / done * (self.total - self.n))} left"
        print(f"{self.desc}: {self.n}/{self.total} [{elapsed:.1f}s{left}] {extra}".rstrip(), file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield start, min(start + size, n)

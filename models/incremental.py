"""The shared machinery of the incremental (cached) forms: cached convolutions over rolling buffers, the
pointwise layers, the IncrementalModel base and the stepper. Each family's form lives beside its network
and is what ``model.cached_form()`` returns (pixelcnn.py, gated_pixelcnn.py, pixelrnn.py).

[1]: Ramachandran et al. 2017, Fast Generation for Convolutional Autoregressive Models,
     https://arxiv.org/abs/1704.06001 (each layer caches the inputs it will read again).

Every masked convolution with a spatial kernel keeps a rolling buffer of its *input*: the kernel's
top half plus the centre row (kh // 2 + 1 rows) over the padded width. Two pure functions drive decoding;
their caches are explicit inputs and outputs (``step`` may update them in place), so they export to ONNX
and TorchScript as plain graphs (the runtime drives the loop):

- ``row(x_prev_row, has_prev, *caches)`` at the start of each row: writes the finished previous image row
  into the first layer's buffer, rolls every buffer up one row, and (gated model) computes the whole new
  row of the vertical stack, which depends only on rows above.
- ``step(x_row, j, *caches)`` for each sub-pixel: writes the current image row (its sampled part) into the
  first layer's buffer, computes every layer at column j only, writing each layer's output into the next
  layer's buffer, and returns the log-probabilities of pixel (i, j) for every channel.

Per image the work is about one forward pass (plus the masked-out taps a dense kernel would compute), and
the memory is O(layers x kernel height x width x channels). Colour models call ``step`` once per
sub-pixel: a layer's group-g output at (i, j) depends only on channels < g of x(i, j), so the call for
channel k is exact for channel k, and the last call leaves every cache final.

Writes use ``index_copy_`` (``scatter_`` in ONNX: one ScatterElements) and reads ``index_select`` (a Slice of
the buffer's row view in ONNX) on flat buffers: both export to every backend and keep the graphs free of
data-dependent shapes.

Every cache is position-major, (B, positions, features): a buffer row after row with each position's
channels together, a row state (B, W, F). A step reads a kernel window of a few positions and writes one
position, so position-major makes each read or write one contiguous run per image; with the channels first
the same window was a run of kw floats per channel and row, and at batch 256 those strided reads took half of
an onnxruntime step (bundle format 6; formats 4-5 were channel-major).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MaskedConv2d


class CachedConv(nn.Module):
    """A MaskedConv2d applied one position (or one row) at a time over a rolling input buffer.

    The buffer is flat, (B, rows * (W + 2p), I), row after row, so that writing one column is a single
    ``scatter_`` and reading one kernel window a single ``index_select``: a decoding step is dominated by
    the number of ops, not their arithmetic.
    """

    def __init__(self, conv: MaskedConv2d, width: int) -> None:
        super().__init__()
        self.conv = conv
        kh, kw = conv.kernel_size
        self.rows = kh // 2 + 1  # the taps at and above the centre row; the mask zeroes the rest
        self.kw = kw
        self.pad = kw // 2
        self.width = width
        self.stride = width + 2 * self.pad  # one buffer row
        # Flat offsets of the kernel window at column 0, in the weight's (rows, kw) order.
        taps = torch.arange(self.rows)[:, None] * self.stride + torch.arange(kw)[None, :]
        self.register_buffer("taps", taps.reshape(-1), persistent=False)
        self.register_buffer("current", torch.tensor([(self.rows - 1) * self.stride + self.pad]), persistent=False)
        off_centre = torch.ones(self.rows, kw)
        off_centre[self.rows - 1, self.pad] = 0.0
        self.register_buffer("off_centre", off_centre, persistent=False)

    def buffer_shape(self) -> tuple[int, int]:
        return self.rows * self.stride, self.conv.in_channels

    def weight(self) -> torch.Tensor:
        return self.conv.masked_weight()[:, :, : self.rows]  # (O, I, rows, kw)

    def grid(self, buf: torch.Tensor) -> torch.Tensor:
        """The buffer as an image strip for a convolution: (B, I, rows, W + 2p)."""
        return buf.reshape(buf.shape[0], self.rows, self.stride, buf.shape[2]).permute(0, 3, 1, 2)

    def roll(self, buf: torch.Tensor) -> torch.Tensor:
        """Drop the oldest row; the new current row starts as zero padding."""
        return torch.cat([buf[:, self.stride :], torch.zeros_like(buf[:, : self.stride])], dim=1)

    def write_row(self, buf: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Replace the current row with ``row`` (B, I, W)."""
        padded = F.pad(row, (self.pad, self.pad)).transpose(1, 2)  # (B, W + 2p, I)
        if WriteLog.active is not None:
            WriteLog.active.record(buf, "span", (self.rows - 1) * self.stride, padded)
            return buf
        return torch.cat([buf[:, : -self.stride], padded], dim=1)

    def indices(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(write index, window indices) for column j; layers of one geometry share them within a step."""
        return self.current + j, self.taps + j

    def write_at(self, buf: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return write_column(buf, index, value)

    def read_window(self, buf: torch.Tensor, window_index: torch.Tensor, entries: list) -> torch.Tensor:
        """The kernel window at ``window_index`` as (B, rows * kw * I), seeing the recorded writes ``entries``."""
        if entries or not OnnxOps.active:
            return read_columns(buf, window_index, entries).flatten(1)
        # In ONNX a Slice of the (B, rows, stride, I) view: onnxruntime's Gather took 2.7x as long for the same
        # window (measured at batch 256), and windows dominate a step there.
        rows = buf.reshape(buf.shape[0], self.rows, self.stride, buf.shape[2])
        start: torch.Tensor | int = window_index[0]
        if OnnxOps.exporter == "dynamo":  # torch.export wants a bounded integer, the old tracer a tensor
            start = int(start.item())
            torch._check(start >= 0)
            torch._check(start + self.kw <= self.stride)
        return torch.narrow(rows, 2, start, self.kw).flatten(1)

    def at_window(self, buf: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        log = WriteLog.active
        window = self.read_window(buf, window_index, log.of(buf) if log is not None else [])
        # Transposed weights fold into constants when the graph is frozen: one addmm per call.
        w_t = self.weight().permute(0, 2, 3, 1).flatten(1).t()  # (rows * kw * I, O), the window's order
        return window @ w_t if self.conv.bias is None else torch.addmm(self.conv.bias, window, w_t)

    def write_col_at(
        self, buf: torch.Tensor, j: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set column j of the current row to ``value`` (B, I), in place, then ``at(buf, j)``: (the buffer, the
        output at column j). In place because an out-of-place copy of the whole buffer would dominate a step;
        the caches belong to the decoding loop, which hands each step's outputs back in."""
        return self.write_at_window(buf, *self.indices(j), value)

    def write_at_window(
        self, buf: torch.Tensor, index: torch.Tensor, window_index: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``write_at(buf, index, value)`` then ``at_window(buf, window_index)``, for (index, window_index) from
        one ``indices(j)``: the write lands on the window's centre tap of its current row.

        While a WriteLog records, the written column is folded in after the product instead of patched into
        the window: out = (window before the write) @ W with the centre tap zeroed + value @ W's centre tap,
        both weight matrices constants once the graph is frozen (a batch-sized patch of the window, or a
        correction that reads the old column back, cost as much as the cache copy the log saves)."""
        log = WriteLog.active
        if log is None:
            buf = self.write_at(buf, index, value)
            return buf, self.at_window(buf, window_index)
        window = self.read_window(buf, window_index, log.of(buf))
        w = self.weight()
        centre = w[:, :, self.rows - 1, self.pad]  # (O, I)
        w_t = (w * self.off_centre).permute(0, 2, 3, 1).flatten(1).t()
        at_centre = value @ centre.t() if self.conv.bias is None else torch.addmm(self.conv.bias, value, centre.t())
        return self.write_at(buf, index, value), torch.addmm(at_centre, window, w_t)

    def at(self, buf: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The convolution's output at column j of the current row: (B, O)."""
        return self.at_window(buf, self.taps + j)

    def window(
        self, buf: torch.Tensor, rows: torch.Tensor, advance: torch.Tensor, *, keep_current: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution along K whole rows of its input, ``rows`` (B, I, K, W), the first being the buffer's
        current row (the buffer holds the rows above it): -> (output (B, O, K, W), the buffer ``advance`` rows
        further down, 0 <= advance < K, as ``row`` leaves it there: the current row zero, or with
        ``keep_current`` the window's row at that position, for layers whose ``row`` fills it in)."""
        b, i = buf.shape[0], buf.shape[2]
        above = self.grid(buf)[:, :, : self.rows - 1]
        grid = torch.cat([above, F.pad(rows, (self.pad, self.pad))], dim=2)  # (B, I, rows - 1 + K, stride)
        out = F.conv2d(grid, self.weight(), self.conv.bias)
        if keep_current:
            kept = dynamic_rows(grid, advance, self.rows)
        else:
            kept = torch.cat([dynamic_rows(grid, advance, self.rows - 1), torch.zeros_like(grid[:, :, :1])], dim=2)
        return out, kept.permute(0, 2, 3, 1).reshape(b, self.rows * self.stride, i)

    def row_out(self, buf: torch.Tensor) -> torch.Tensor:
        """The convolution's output along the whole current row: (B, O, W)."""
        return F.conv2d(self.grid(buf), self.weight(), self.conv.bias)[:, :, 0]


class OnnxOps:
    """Set while a graph is exported to ONNX (export/exporter.py): the cached forms then pick the operations
    onnxruntime runs fastest. An explicit switch, because ``torch.onnx.is_in_onnx_export()`` was seen to read
    False inside the dynamo exporter's trace once the same functions had run eagerly before it."""

    active = False
    exporter = ""  # "dynamo" or "torchscript-based": they take a dynamic slice start in different forms

    def __init__(self, exporter: str) -> None:
        self.exporter = exporter

    def __enter__(self) -> None:
        OnnxOps.active, OnnxOps.exporter = True, self.exporter

    def __exit__(self, *exc: object) -> None:
        OnnxOps.active, OnnxOps.exporter = False, ""


class WriteLog:
    """Cache writes recorded instead of performed, for the ``step_updates`` graph (models/graphs.py): a step
    whose outputs are only what it writes, so that a runtime applies them to its own buffers in place rather
    than copying every cache in and out of the graph on every step. While a log is active, ``write_column`` and
    ``CachedConv.write_row`` record (and return the buffer unchanged) and ``read_columns`` patches what it
    gathers with the recorded writes, so the step computes exactly what it computes with real writes."""

    active: WriteLog | None = None

    def __init__(self) -> None:
        self.entries: dict[int, list[tuple[str, Any, torch.Tensor]]] = {}

    def record(self, buf: torch.Tensor, kind: str, where: Any, value: torch.Tensor) -> None:
        self.entries.setdefault(id(buf), []).append((kind, where, value))

    def of(self, buf: torch.Tensor) -> list[tuple[str, Any, torch.Tensor]]:
        return self.entries.get(id(buf), [])

    def __enter__(self) -> WriteLog:
        if WriteLog.active is not None:
            raise RuntimeError("write logs do not nest")
        WriteLog.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        WriteLog.active = None


def read_columns(buf: torch.Tensor, index: torch.Tensor, entries: list | None = None) -> torch.Tensor:
    """buf[:, index] for buf (B, N, F) and index (n,), seeing the writes a WriteLog holds for buf (or
    ``entries``, a prefix of them)."""
    got = buf.index_select(1, index)
    log = WriteLog.active
    if entries is None:
        entries = log.of(buf) if log is not None else []
    for kind, where, value in entries:
        if kind == "column":  # value (B, F) at the dynamic position ``where`` (1,)
            got = torch.where((index == where)[None, :, None], value[:, None, :], got)
        else:  # "span": value (B, L, F) at the static positions where .. where + L - 1
            inside = (index >= where) & (index < where + value.shape[1])
            picked = value.index_select(1, (index - where).clamp(0, value.shape[1] - 1))
            got = torch.where(inside[None, :, None], picked, got)
    return got


def write_column(buf: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """buf[:, index] = value, in place: buf (B, N, F), index (1,), value (B, F).

    Exported to ONNX as ``scatter_``, which both exporters turn into one ScatterElements (the dynamo exporter
    lowers ``index_copy_`` to a ScatterND between two transposes of the whole buffer: ONNX cached decoding
    measured 1.5x slower at batch 64). Elsewhere ``index_copy_``, which libtorch runs 1.5x faster than the
    expanded-index scatter at batch 16-64.
    """
    if WriteLog.active is not None:
        WriteLog.active.record(buf, "column", index.reshape(1), value)
        return buf
    v = value[:, None, :]
    if OnnxOps.active:
        return buf.scatter_(1, index.reshape(1, 1, 1).expand_as(v), v)
    return buf.index_copy_(1, index, v)


def dynamic_rows(x: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, :, start : start + n] for a (1,) int64 tensor ``start``: one Gather in ONNX. An index_select rather
    than a slice at ``start.item()``, so every exporter traces it without a data-dependent size; these are a
    few rows of a cache, where a Gather costs nothing measurable."""
    return x.index_select(2, start + torch.arange(n, device=x.device))


def pointwise(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 (masked) convolution at one position: v (B, I) -> (B, O)."""
    w = conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight
    w_t = w[:, :, 0, 0].t()
    return v @ w_t if conv.bias is None else torch.addmm(conv.bias, v, w_t)


def pointwise_row(conv: nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution along a row: v (B, I, W) -> (B, O, W)."""
    w = conv.masked_weight() if isinstance(conv, MaskedConv2d) else conv.weight
    return F.linear(v.transpose(1, 2), w[:, :, 0, 0], conv.bias).transpose(1, 2)


class IncrementalModel(nn.Module):
    """Base of the cached forms. Subclasses define the caches, ``row`` and ``step``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def cache_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape without the batch dimension) of every cache, in argument order."""
        raise NotImplementedError

    def init_caches(self, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.zeros((batch, *shape), dtype=dtype, device=device) for _, shape in self.cache_specs()]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.normalize(x)

    def head_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """Raw parameters of one pixel (B, P * C) -> log-probabilities (B, C, K)."""
        b = params.shape[0]
        c = self.config.channels
        raw = params.reshape(b, -1, c, 1, 1)
        return self.model.head.log_probs(raw).reshape(b, c, self.config.levels)

    def row(
        self, x_prev_row: torch.Tensor, has_prev: torch.Tensor, caches: list[torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def step(
        self, x_row: torch.Tensor, j: torch.Tensor, caches: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def window(
        self, x_rows: torch.Tensor, advance: torch.Tensor, caches: list[torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Whole rows at once, for windowed parallel decoding (runtime/decoding.py): x_rows (B, C, K, W), the K
        image rows from the caches' current row down, with the caches as ``row`` leaves them at that row ->
        (log-probabilities (B, C, K, W, levels), the caches as ``row`` leaves them ``advance`` rows further
        down). Families without it leave it unimplemented (``has_window``)."""
        raise NotImplementedError

    @property
    def has_window(self) -> bool:
        return type(self).window is not IncrementalModel.window

    def grid_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """Raw parameters (B, P * C, K, W) -> log-probabilities (B, C, K, W, levels), as the full model's."""
        return self.model.grid_log_probs(params)


class EagerStepper:
    """Drives an IncrementalModel from numpy, for the runtime's cached decoding loop (training sample
    grids and tests use it; the exported backends implement the same three methods)."""

    def __init__(self, inc: IncrementalModel, dtype: torch.dtype = torch.float32) -> None:
        self.inc = inc.to(dtype).eval()
        self.dtype = dtype
        self.device = next(inc.parameters()).device
        self.caches: list[torch.Tensor] = []
        self.labels: torch.Tensor | None = None

    def reset(self, batch: int, labels: object | None = None) -> None:
        import numpy as np

        self.caches = self.inc.init_caches(batch, self.dtype, self.device)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).to(self.device)

    @torch.no_grad()
    def row(self, x_prev_row: object, has_prev: bool) -> None:
        x = torch.as_tensor(x_prev_row, device=self.device)
        flag = torch.tensor([1.0 if has_prev else 0.0], dtype=self.dtype, device=self.device)
        self.caches = self.inc.row(x, flag, self.caches, self.labels)

    @torch.no_grad()
    def step(self, x_row: object, j: int) -> object:
        x = torch.as_tensor(x_row, device=self.device)
        lp, self.caches = self.inc.step(x, torch.tensor([j], device=self.device), self.caches, self.labels)
        return lp.cpu().numpy()

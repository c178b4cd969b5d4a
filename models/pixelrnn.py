"""PixelRNN: the Row LSTM and the Diagonal BiLSTM, with their exact cached forms.

[1]: van den Oord et al. 2016, Pixel Recurrent Neural Networks, https://arxiv.org/abs/1601.06759
     (section 3.1 Row LSTM, 3.2 Diagonal BiLSTM, 3.3 residual connections, 3.4 masks).

Both start with a 7x7 mask-A convolution, stack LSTM layers with residual connections (each layer's
hidden state goes through a 1x1 mask-B convolution and is added to its input), and end with two 1x1
mask-B layers into a shared likelihood head. Colour models split features into R, G, B groups
(``channel % 3``, hidden a multiple of 3) and every input-to-state convolution is masked by group;
state-to-state connections only read past pixels, whose every group is known.

- Row LSTM: row by row, gates = K_is (*) x_i (a masked 1 x k convolution along the row) + K_ss (*) h_{i-1}
  (a 1-D convolution of width k along the previous row). Receptive field: a triangle above the pixel.
- Diagonal BiLSTM: the input is skewed so that each diagonal becomes a column; a column LSTM runs left to
  right, whose state at (i, j) reads (i - 1, j) and (i, j - 1) (a kernel-2 convolution down the previous
  column). The right-to-left direction runs on the mirrored image; its output is shifted down one row so
  that no pixel sees its own row's right side. States at skew-padding positions are kept at zero, so that
  a pixel's left neighbour at column 0 and its upper neighbour at row 0 are exactly zero (which is also what
  the cached form assumes).

Export: the recurrences are Python loops over rows (Row LSTM) or skewed columns (Diagonal BiLSTM). The
image size is fixed per model, so tracing unrolls them into a straight-line graph (H or W + H - 1 steps
per layer), which every ONNX runtime executes without a Loop/Scan operator and without data-dependent
shapes. The TorchScript archive keeps the Diagonal BiLSTM's column recurrence as one scripted loop
(``column_lstm``) instead: unrolled, its code was most of the archive, compiled by every torch.jit.load.
The cached forms need no recurrence inside a graph at all: the runtime drives it, row by row and
pixel by pixel, with the states as explicit caches.

Cached forms (the cheapest exact ones):
- Row LSTM: the state is carried along the rows. At the start of row i the previous row's states are final,
  so K_ss (*) h_{i-1} is computed once for the whole row; each pixel then costs one masked 1 x k window of
  its layer input and one LSTM cell update per layer.
- Diagonal BiLSTM: the left-to-right state at (i, j) needs (i - 1, j) and (i, j - 1): one cell per pixel.
  The right-to-left state of row i - 1 depends on that whole row, but it enters the output only shifted
  down a row: so it is computed once, right to left, at the start of row i, from the layer inputs that the
  steps of row i - 1 stored. Nothing is recomputed; a row costs W backward cells per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AutoregressiveConfig, AutoregressiveModel, ConfigError
from .incremental import CachedConv, IncrementalModel, pointwise, pointwise_row, read_columns, write_column
from .layers import MaskedConv2d, check_group_multiple


@dataclass
class PixelRNNConfig(AutoregressiveConfig):
    hidden: int = 32  # LSTM state size, also the residual stream's width
    layers: int = 4
    first_kernel: int = 7
    kernel: int = 3  # Row LSTM: width of the input-to-state and state-to-state convolutions
    output_hidden: int = 32

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1 or self.layers < 1 or self.output_hidden < 1:
            raise ConfigError(f"need hidden, layers, output_hidden >= 1; got {self.hidden}, {self.layers}, "
                              f"{self.output_hidden}")
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be odd, got {self.kernel}")
        try:
            check_group_multiple(self.hidden, self.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gates (B, 4h, ...) ordered (o, f, i, g); returns (h, c)."""
    o, f, i, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class PixelRNNBase(AutoregressiveModel):
    config: PixelRNNConfig

    def __init__(self, config: PixelRNNConfig) -> None:
        super().__init__(config)
        c, g = config, config.channels
        self.input_conv = MaskedConv2d(c.channels, c.hidden, c.first_kernel, mask_type="A", groups=g)
        self.residual = nn.ModuleList(MaskedConv2d(c.hidden, c.hidden, 1, mask_type="B", groups=g)
                                      for _ in range(c.layers))
        self.init_output_layers(c.hidden, c.output_hidden)
        if c.num_classes:
            self.label_embedding = nn.Embedding(c.num_classes, c.hidden)

    def recurrent(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The LSTM layer ``index`` over a whole image: (B, hidden, H, W) -> (B, hidden, H, W)."""
        raise NotImplementedError

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        h = self.input_conv(self.normalize(x))  # (B, hidden, H, W)
        bias = self.label_bias(labels, self.label_embedding)
        if bias is not None:
            h = h + bias
        for i, res in enumerate(self.residual):
            h = h + res(self.recurrent(i, h))
        return self.output_params(h)


class RowLSTM(PixelRNNBase):
    def __init__(self, config: PixelRNNConfig) -> None:
        super().__init__(config)
        c = config
        self.input_to_state = nn.ModuleList(
            MaskedConv2d(c.hidden, 4 * c.hidden, (1, c.kernel), mask_type="B", groups=c.channels, shape="horizontal")
            for _ in range(c.layers))
        self.state_to_state = nn.ModuleList(nn.Conv1d(c.hidden, 4 * c.hidden, c.kernel, padding=c.kernel // 2)
                                            for _ in range(c.layers))

    def recurrent(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gates_x = self.input_to_state[index](x)  # (B, 4h, H, W): every row's input part at once
        b, _, height, width = x.shape
        h = x.new_zeros(b, self.config.hidden, width)
        c = torch.zeros_like(h)
        rows = []
        for i in range(height):
            h, c = lstm_cell(gates_x[:, :, i] + self.state_to_state[index](h), c)
            rows.append(h)
        return torch.stack(rows, dim=2)

    def cached_form(self) -> IncrementalModel:
        return IncrementalRowLSTM(self)


def skew(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W + H - 1): row i moves i columns right.

    By reshaping, not row by row: padded with H zeros on the right, the rows laid end to end are read back
    one column narrower, so that row i starts i places later. A few nodes in an exported graph instead of a
    scatter per row (the skews were a fifth of an unrolled Diagonal BiLSTM graph); the same values."""
    b, c, h, w = x.shape
    flat = F.pad(x, (0, h)).reshape(b, c, h * (w + h))
    return flat[:, :, : h * (w + h - 1)].reshape(b, c, h, w + h - 1)


def unskew(y: torch.Tensor, width: int) -> torch.Tensor:
    """skew's inverse: (B, C, H, W + H - 1) -> (B, C, H, W), read back one column wider."""
    b, c, h, ws = y.shape
    flat = F.pad(y.reshape(b, c, h * ws), (0, h))
    return flat.reshape(b, c, h, ws + 1)[:, :, :, :width]


@torch.jit.script
def column_lstm(gates_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, width: int) -> torch.Tensor:
    """DiagonalBiLSTM._direction as one TorchScript loop: the same operations in the same order."""
    b, height, ws = gates_x.shape[0], gates_x.shape[2], gates_x.shape[3]
    h = gates_x.new_zeros([b, weight.shape[1], height])
    c = torch.zeros_like(h)
    rows = torch.arange(height, device=gates_x.device)
    cols: list[torch.Tensor] = []
    for t in range(ws):
        valid = ((t - rows >= 0) & (t - rows < width)).to(gates_x.dtype)[None, None, :]
        gates = gates_x[:, :, :, t] + F.conv1d(F.pad(h, [1, 0]), weight, bias)
        o, f, i, g = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        h, c = h_new * valid, c_new * valid
        cols.append(h)
    return torch.stack(cols, dim=3)


class DiagonalBiLSTM(PixelRNNBase):
    def __init__(self, config: PixelRNNConfig) -> None:
        super().__init__(config)
        c = config
        g = c.channels

        def is_conv() -> MaskedConv2d:
            return MaskedConv2d(c.hidden, 4 * c.hidden, 1, mask_type="B", groups=g)

        self.is_fwd = nn.ModuleList(is_conv() for _ in range(c.layers))
        self.is_bwd = nn.ModuleList(is_conv() for _ in range(c.layers))
        # State-to-state: kernel 2 down the previous (skewed) column: tap 0 reads the pixel above, tap 1 the
        # pixel to the left (right, for the mirrored direction).
        self.ss_fwd = nn.ModuleList(nn.Conv1d(c.hidden, 4 * c.hidden, 2) for _ in range(c.layers))
        self.ss_bwd = nn.ModuleList(nn.Conv1d(c.hidden, 4 * c.hidden, 2) for _ in range(c.layers))

    # Set by the TorchScript export (export/lean.py): run the column recurrence as one scripted loop, so that
    # the archive holds a few lines of code for it rather than every step unrolled (W + H - 1 per direction
    # and layer), which torch.jit.load would compile each time. ONNX exports keep the unrolled form.
    script_loops = False

    def _direction(self, gates_x: torch.Tensor, ss: nn.Conv1d) -> torch.Tensor:
        """A column LSTM over the skewed gates (B, 4h, H, Ws); states off the image are held at zero."""
        if self.script_loops:
            return column_lstm(gates_x, ss.weight, ss.bias, gates_x.shape[3] - gates_x.shape[2] + 1)
        b, _, height, ws = gates_x.shape
        width = ws - height + 1
        hidden = self.config.hidden
        h = gates_x.new_zeros(b, hidden, height)
        c = torch.zeros_like(h)
        rows = torch.arange(height, device=gates_x.device)
        cols = []
        for t in range(ws):
            valid = ((t - rows >= 0) & (t - rows < width)).to(gates_x.dtype)[None, None, :]  # (1, 1, H)
            h_new, c_new = lstm_cell(gates_x[:, :, :, t] + ss(F.pad(h, (1, 0))), c)
            h, c = h_new * valid, c_new * valid
            cols.append(h)
        return torch.stack(cols, dim=3)  # (B, h, H, Ws)

    def recurrent(self, index: int, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[3]
        fwd = unskew(self._direction(skew(self.is_fwd[index](x)), self.ss_fwd[index]), width)
        mirrored = torch.flip(self.is_bwd[index](x), dims=(3,))
        bwd = torch.flip(unskew(self._direction(skew(mirrored), self.ss_bwd[index]), width), dims=(3,))
        # Shift the right-to-left direction down one row: row i sees only rows above it from that side.
        bwd = F.pad(bwd[:, :, :-1], (0, 0, 1, 0))
        return fwd + bwd


# ---------------------------------------------------------------- cached forms

    def cached_form(self) -> IncrementalModel:
        return IncrementalDiagonalBiLSTM(self)


class _IncrementalPixelRNN(IncrementalModel):
    """Shared parts: the 7x7 input convolution's buffer and the output layers."""

    def __init__(self, model: PixelRNNBase) -> None:
        super().__init__(model)
        self.input_conv = CachedConv(model.input_conv, model.config.width)

    def first(self, x_row: torch.Tensor, j: torch.Tensor, buf: torch.Tensor,
              labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        buf = self.input_conv.write_row(buf, self.normalize(x_row))
        h = self.input_conv.at(buf, j)  # (B, hidden)
        bias = m.label_bias(labels, m.label_embedding)
        return (h if bias is None else h + bias[:, :, 0, 0]), buf

    def head(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return self.head_log_probs(m.output_params_at(h))

    def roll_input(self, x_prev_row: torch.Tensor, has_prev: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        return self.input_conv.roll(self.input_conv.write_row(buf, self.normalize(x_prev_row) * has_prev))

    @staticmethod
    def put(buf: torch.Tensor, j: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Column j of a (B, W, F) row buffer, in place."""
        return write_column(buf, j, value)

    @staticmethod
    def get(buf: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return read_columns(buf, j)[:, 0]


class IncrementalRowLSTM(_IncrementalPixelRNN):
    """Caches: the input buffer; per layer the 1 x k input-to-state buffer of the current row, the current
    row's (h, c) as they are computed, the previous row's c, and K_ss (*) h_{i-1} for the current row."""

    def __init__(self, model: RowLSTM) -> None:
        super().__init__(model)
        self.is_convs = nn.ModuleList(CachedConv(conv, model.config.width) for conv in model.input_to_state)

    def cache_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        specs: list[tuple[str, tuple[int, ...]]] = [("input", self.input_conv.buffer_shape())]
        for i, conv in enumerate(self.is_convs):
            specs += [(f"is{i}", conv.buffer_shape()), (f"h{i}", (c.width, c.hidden)), (f"c{i}", (c.width, c.hidden)),
                      (f"cprev{i}", (c.width, c.hidden)), (f"ss{i}", (c.width, 4 * c.hidden))]
        return specs

    def row(self, x_prev_row, has_prev, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        out = [self.roll_input(x_prev_row, has_prev, caches[0])]
        for i in range(len(self.is_convs)):
            _, h, c, _, _ = caches[1 + 5 * i : 6 + 5 * i]
            # The finished row becomes the previous row; its K_ss term serves every pixel of the new row.
            ss = m.state_to_state[i](h.transpose(1, 2)).transpose(1, 2).contiguous()
            out += [torch.zeros_like(caches[1 + 5 * i]), torch.zeros_like(h), torch.zeros_like(c), c, ss]
        return out

    def step(self, x_row, j, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        h, buf0 = self.first(x_row, j, caches[0], labels)
        new = [buf0]
        for i, conv in enumerate(self.is_convs):
            isb, hb, cb, cprev, ss = caches[1 + 5 * i : 6 + 5 * i]
            isb, gates = conv.write_col_at(isb, j, h)
            gates = gates + self.get(ss, j)
            h_new, c_new = lstm_cell(gates, self.get(cprev, j))
            new += [isb, self.put(hb, j, h_new), self.put(cb, j, c_new), cprev, ss]
            h = h + pointwise(m.residual[i], h_new)
        return self.head(h), new


class IncrementalDiagonalBiLSTM(_IncrementalPixelRNN):
    """Caches per layer: the left-to-right states of the current row (h, c, with a zero column in front for
    the left neighbour of column 0) and of the previous row (h); the layer inputs of the current row; the
    right-to-left states of the previous row (the shifted output) and of the row before (its recurrence)."""

    def cache_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        hw, w1 = (c.width, c.hidden), (c.width + 1, c.hidden)
        specs: list[tuple[str, tuple[int, ...]]] = [("input", self.input_conv.buffer_shape())]
        for i in range(c.layers):
            specs += [(f"fh{i}", w1), (f"fc{i}", w1), (f"fup{i}", hw), (f"inp{i}", hw), (f"bup{i}", hw)]
        return specs

    def _backward_row(self, i: int, inp: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
        """Right-to-left column LSTM over one finished row: inp (B, hidden, W) layer inputs, above (B, hidden, W)
        the row above's right-to-left states -> this row's states (B, hidden, W)."""
        m = self.model
        gates_x = pointwise_row(m.is_bwd[i], inp)  # (B, 4h, W)
        w = m.ss_bwd[i].weight  # (4h, h, 2): tap 0 reads the state above, tap 1 the one to the right
        bias = m.ss_bwd[i].bias
        width = inp.shape[2]
        h_right = torch.zeros_like(above[:, :, 0])
        c_right = torch.zeros_like(h_right)
        states = []
        for j in reversed(range(width)):  # unrolled by tracing: W cells per layer per row
            gates = (gates_x[:, :, j] + F.linear(above[:, :, j], w[:, :, 0], bias)
                     + F.linear(h_right, w[:, :, 1]))
            h_right, c_right = lstm_cell(gates, c_right)
            states.append(h_right)
        return torch.stack(states[::-1], dim=2)

    def row(self, x_prev_row, has_prev, caches, labels=None):  # type: ignore[no-untyped-def]
        out = [self.roll_input(x_prev_row, has_prev, caches[0])]
        for i in range(self.config.layers):
            fh, fc, _, inp, bup = caches[1 + 5 * i : 6 + 5 * i]
            # Right-to-left states of the finished row (zero before the first row): this row's shifted output.
            bwd = self._backward_row(i, inp.transpose(1, 2), bup.transpose(1, 2)) * has_prev
            out += [torch.zeros_like(fh), torch.zeros_like(fc), fh[:, 1:].contiguous(), torch.zeros_like(inp),
                    bwd.transpose(1, 2).contiguous()]
        return out

    def step(self, x_row, j, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        h, buf0 = self.first(x_row, j, caches[0], labels)
        new = [buf0]
        for i in range(self.config.layers):
            fh, fc, fup, inp, bup = caches[1 + 5 * i : 6 + 5 * i]
            inp = self.put(inp, j, h)
            w = m.ss_fwd[i].weight  # (4h, h, 2): tap 0 the state above, tap 1 the state to the left
            gates = (pointwise(m.is_fwd[i], h) + F.linear(self.get(fup, j), w[:, :, 0], m.ss_fwd[i].bias)
                     + F.linear(self.get(fh, j), w[:, :, 1]))  # fh/fc column j holds pixel j - 1
            h_f, c_f = lstm_cell(gates, self.get(fc, j))
            fh, fc = self.put(fh, j + 1, h_f), self.put(fc, j + 1, c_f)
            new += [fh, fc, fup, inp, bup]
            h = h + pointwise(m.residual[i], h_f + self.get(bup, j))
        return self.head(h), new

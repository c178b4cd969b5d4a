"""Gated PixelCNN: vertical and horizontal stacks without the blind spot, gated tanh·sigmoid units,
optional class conditioning.

[1]: van den Oord et al. 2016, Conditional Image Generation with PixelCNN Decoders,
     https://arxiv.org/abs/1606.05328 (figure 2: one gated layer; equation 4: the conditioning bias).

The stacks are written with masked convolutions rather than [1]'s cropped n x (n//2+1) kernels and
shifts; the functions are the same:
- the vertical stack at (i, j) sees the rows strictly above row i (mask "vertical A" on the first layer,
  "vertical B", which adds the centre row of the previous vertical map, after it), within the kernel's
  width; so it can feed the horizontal stack at the same position with an unmasked 1x1 link;
- the horizontal stack sees the current row left of j (mask "horizontal A" first, "horizontal B" after),
  plus the channel groups before the current one at column j (R -> G -> B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AutoregressiveConfig, AutoregressiveModel, ConfigError, check_dropout
from .incremental import CachedConv, IncrementalModel, dynamic_rows, pointwise, pointwise_row
from .layers import MaskedConv2d, check_group_multiple, gate


@dataclass
class GatedPixelCNNConfig(AutoregressiveConfig):
    hidden: int = 64  # features per stack (after the gate)
    layers: int = 8  # gated layers after the first
    first_kernel: int = 7
    kernel: int = 3
    output_hidden: int = 64
    dropout: float = 0.0  # on the gated horizontal features before each residual 1x1, in training only

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1 or self.layers < 0 or self.output_hidden < 1:
            raise ConfigError(
                f"need hidden >= 1, layers >= 0, output_hidden >= 1; got {self.hidden}, {self.layers}, "
                f"{self.output_hidden}"
            )
        check_dropout(self.dropout)
        try:
            check_group_multiple(self.hidden, self.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None


class GatedLayer(nn.Module):
    """One gated layer of [1], figure 2. ``first``: mask A, no residual on the horizontal stack."""

    def __init__(
        self, in_features: int, hidden: int, kernel: int, groups: int, num_classes: int, *, first: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mask = "A" if first else "B"
        self.first = first
        self.dropout = dropout
        self.v_conv = MaskedConv2d(in_features, 2 * hidden, kernel, mask_type=mask, shape="vertical")
        self.h_conv = MaskedConv2d(
            in_features, 2 * hidden, (1, kernel), mask_type=mask, groups=groups, shape="horizontal"
        )
        # The vertical features at (i, j) only see rows above i, so they may reach every colour group.
        self.link = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = None if first else MaskedConv2d(hidden, hidden, 1, mask_type="B", groups=groups)
        self.cond = nn.Embedding(num_classes, 2 * hidden) if num_classes else None

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(v)  # (B, 2h, H, W)
        h_pre = self.h_conv(h) + self.link(v_pre)
        if self.cond is not None and labels is not None:
            bias = self.cond(labels.long())[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        v_new = gate(v_pre)  # (B, h, H, W)
        h_gated = gate(h_pre)
        if self.h_out is None:
            return v_new, h_gated
        if self.training and self.dropout:  # a Python branch: traced and exported graphs (eval) hold no dropout
            h_gated = F.dropout(h_gated, self.dropout)
        h_new = h + self.h_out(h_gated)
        return v_new, h_new


class GatedPixelCNN(AutoregressiveModel):
    config: GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig) -> None:
        super().__init__(config)
        c, g = config, config.channels
        self.layers = nn.ModuleList(
            [GatedLayer(c.channels, c.hidden, c.first_kernel, g, c.num_classes, first=True)]
            + [GatedLayer(c.hidden, c.hidden, c.kernel, g, c.num_classes, first=False, dropout=c.dropout)
               for _ in range(c.layers)]
        )
        self.init_output_layers(c.hidden, c.output_hidden)

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        v = h = self.normalize(x)  # (B, C, H, W)
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.output_params(h)  # (B, P * C, H, W)

    def cached_form(self) -> IncrementalGatedPixelCNN:
        return IncrementalGatedPixelCNN(self)


class IncrementalGatedPixelCNN(IncrementalModel):
    """Caches, per gated layer: the vertical convolution's buffer of the vertical stack below it, the
    link into the horizontal stack for the current row (computed once per row), and (after the first
    layer) the horizontal convolution's one-row buffer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        w = model.config.width
        self.v_convs = nn.ModuleList(CachedConv(layer.v_conv, w) for layer in model.layers)
        self.h_convs = nn.ModuleList(CachedConv(layer.h_conv, w) for layer in model.layers)
        self.n = len(model.layers)

    def cache_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        c = self.config
        specs: list[tuple[str, tuple[int, ...]]] = []
        for i in range(self.n):
            specs.append((f"v{i}", self.v_convs[i].buffer_shape()))
            specs.append((f"link{i}", (c.width, 2 * c.hidden)))
            if i > 0:
                specs.append((f"h{i}", self.h_convs[i].buffer_shape()))
        return specs

    def _split(self, caches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        v, link, h = [], [], []
        it = iter(caches)
        for i in range(self.n):
            v.append(next(it))
            link.append(next(it))
            if i > 0:
                h.append(next(it))
        return v, link, h

    def _join(self, v: list[torch.Tensor], link: list[torch.Tensor], h: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i in range(self.n):
            out += [v[i], link[i]] + ([h[i - 1]] if i > 0 else [])
        return out

    def _cond(self, layer: nn.Module, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None if layer.cond is None or labels is None else layer.cond(labels.long())  # (B, 2h)

    def row(self, x_prev_row, has_prev, caches, labels=None):  # type: ignore[no-untyped-def]
        v, _, h = self._split(caches)
        new_v, new_link = [], []
        below = None  # the previous layer's vertical output along the current row
        for i, layer in enumerate(self.model.layers):
            cached = self.v_convs[i]
            if i == 0:
                buf = cached.roll(cached.write_row(v[0], self.normalize(x_prev_row) * has_prev))
            else:
                buf = cached.write_row(cached.roll(v[i]), below)
            v_pre = cached.row_out(buf)  # (B, 2h, W)
            link = pointwise_row(layer.link, v_pre).transpose(1, 2).contiguous()  # (B, W, 2h): position-major
            cond = self._cond(layer, labels)
            if cond is not None:
                v_pre = v_pre + cond[:, :, None]
            below = gate(v_pre)  # (B, h, W)
            new_v.append(buf)
            new_link.append(link)
        return self._join(new_v, new_link, [torch.zeros_like(b) for b in h])

    def step(self, x_row, j, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        v, link, hbufs = self._split(caches)
        first = self.h_convs[0]
        x_buf = F.pad(self.normalize(x_row), (first.pad, first.pad)).transpose(1, 2)  # (B, W + 2p, C): one row
        new_h = []
        h = None
        for i, layer in enumerate(m.layers):
            if i == 0:
                h_pre = first.at(x_buf, j)
            else:
                buf, h_pre = self.h_convs[i].write_col_at(hbufs[i - 1], j, h)
                new_h.append(buf)
            h_pre = h_pre + link[i].index_select(1, j.reshape(1))[:, 0]
            cond = self._cond(layer, labels)
            if cond is not None:
                h_pre = h_pre + cond
            gated = gate(h_pre[:, :, None])[:, :, 0]  # (B, h)
            h = gated if layer.h_out is None else h + pointwise(layer.h_out, gated)
        out = m.output_params_at(h)
        return self.head_log_probs(out), self._join(v, link, new_h)

    def window(self, x_rows, advance, caches, labels=None):  # type: ignore[no-untyped-def]
        # The full layers of GatedLayer.forward on the window, the vertical convolutions reading the rows
        # above it from their buffers. The caches handed back are row()'s at row F + advance: the vertical
        # buffers (after the first) hold that row of the stack below, the links its vertical link.
        v_bufs, _, h_bufs = self._split(caches)
        v = h = self.normalize(x_rows)
        new_v, new_link = [], []
        for i, layer in enumerate(self.model.layers):
            v_pre, buf = self.v_convs[i].window(v_bufs[i], v, advance, keep_current=i > 0)
            link = layer.link(v_pre)
            h_pre = layer.h_conv(h) + link
            new_v.append(buf)
            new_link.append(dynamic_rows(link, advance, 1)[:, :, 0].transpose(1, 2).contiguous())
            cond = self._cond(layer, labels)
            if cond is not None:
                v_pre, h_pre = v_pre + cond[:, :, None, None], h_pre + cond[:, :, None, None]
            v = gate(v_pre)
            gated = gate(h_pre)
            h = gated if layer.h_out is None else h + layer.h_out(gated)
        out = self.model.output_params(h)
        return self.grid_log_probs(out), self._join(new_v, new_link, [torch.zeros_like(b) for b in h_bufs])

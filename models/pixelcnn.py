"""PixelCNN: a 7x7 mask-A convolution, residual blocks of mask-B 3x3 convolutions, 1x1 output layers.

[1]: van den Oord et al. 2016, Pixel Recurrent Neural Networks, https://arxiv.org/abs/1601.06759
     (section 3.5 and figure 5: the residual block 1x1 -> 3x3 -> 1x1 with h and 2h features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AutoregressiveConfig, AutoregressiveModel, ConfigError, check_dropout
from .incremental import CachedConv, IncrementalModel, pointwise
from .layers import MaskedConv2d


@dataclass
class PixelCNNConfig(AutoregressiveConfig):
    hidden: int = 64  # 2h in [1]: features carried between residual blocks
    layers: int = 8  # residual blocks
    first_kernel: int = 7
    kernel: int = 3
    output_hidden: int = 64
    dropout: float = 0.0  # on each residual block's inner features, in training only

    def validate(self) -> None:
        super().validate()
        if self.hidden < 2 or self.layers < 0 or self.output_hidden < 1:
            raise ConfigError(
                f"need hidden >= 2, layers >= 0, output_hidden >= 1; got {self.hidden}, {self.layers}, "
                f"{self.output_hidden}"
            )
        check_dropout(self.dropout)


class ResidualBlock(nn.Module):
    """relu -> 1x1 (2h -> h) -> relu -> kxk mask B -> relu -> 1x1 (h -> 2h), added to the input."""

    def __init__(self, hidden: int, kernel: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        inner = max(hidden // 2, 1)
        self.reduce = MaskedConv2d(hidden, inner, 1, mask_type="B", groups=groups)
        self.conv = MaskedConv2d(inner, inner, kernel, mask_type="B", groups=groups)
        self.expand = MaskedConv2d(inner, hidden, 1, mask_type="B", groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(F.relu(x))
        y = F.relu(self.conv(F.relu(y)))
        if self.training and self.dropout:  # a Python branch: traced and exported graphs (eval) hold no dropout
            y = F.dropout(y, self.dropout)
        return x + self.expand(y)


class PixelCNN(AutoregressiveModel):
    config: PixelCNNConfig

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__(config)
        c, g = config, config.channels
        self.input_conv = MaskedConv2d(c.channels, c.hidden, c.first_kernel, mask_type="A", groups=g)
        self.blocks = nn.ModuleList(ResidualBlock(c.hidden, c.kernel, g, c.dropout) for _ in range(c.layers))
        self.init_output_layers(c.hidden, c.output_hidden)
        if c.num_classes:
            self.label_embedding = nn.Embedding(c.num_classes, c.hidden)

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        h = self.input_conv(self.normalize(x))  # (B, hidden, H, W)
        bias = self.label_bias(labels, self.label_embedding)
        if bias is not None:
            h = h + bias
        for block in self.blocks:
            h = block(h)
        return self.output_params(h)  # (B, P * C, H, W)

    def cached_form(self) -> IncrementalPixelCNN:
        return IncrementalPixelCNN(self)


class IncrementalPixelCNN(IncrementalModel):
    """Caches: the 7x7 input convolution's buffer of x, and each residual block's kxk buffer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        w = model.config.width
        self.input_conv = CachedConv(model.input_conv, w)
        self.block_convs = nn.ModuleList(CachedConv(b.conv, w) for b in model.blocks)

    def cache_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        specs = [("input", self.input_conv.buffer_shape())]
        return specs + [(f"block{i}", c.buffer_shape()) for i, c in enumerate(self.block_convs)]

    def row(self, x_prev_row, has_prev, caches, labels=None):  # type: ignore[no-untyped-def]
        first = self.input_conv.write_row(caches[0], self.normalize(x_prev_row) * has_prev)
        rest = [c.roll(buf) for c, buf in zip(self.block_convs, caches[1:], strict=True)]
        return [self.input_conv.roll(first), *rest]

    def step(self, x_row, j, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        buf0 = self.input_conv.write_row(caches[0], self.normalize(x_row))
        h = self.input_conv.at(buf0, j)  # (B, hidden)
        bias = m.label_bias(labels, m.label_embedding)
        if bias is not None:
            h = h + bias[:, :, 0, 0]
        new = [buf0]
        shared = self.block_convs[0].indices(j) if len(self.block_convs) else None
        for block, cached, buf in zip(m.blocks, self.block_convs, caches[1:], strict=True):
            write, window = shared  # type: ignore[misc]
            y = F.relu(pointwise(block.reduce, F.relu(h)))
            buf, y = cached.write_at_window(buf, write, window, y)
            new.append(buf)
            h = h + pointwise(block.expand, F.relu(y))
        out = m.output_params_at(h)  # (B, P * C)
        return self.head_log_probs(out), new

    def window(self, x_rows, advance, caches, labels=None):  # type: ignore[no-untyped-def]
        m = self.model
        h, first = self.input_conv.window(caches[0], self.normalize(x_rows), advance)
        bias = m.label_bias(labels, m.label_embedding)
        if bias is not None:
            h = h + bias
        new = [first]
        for block, cached, buf in zip(m.blocks, self.block_convs, caches[1:], strict=True):
            y, buf = cached.window(buf, F.relu(block.reduce(F.relu(h))), advance)
            new.append(buf)
            h = h + block.expand(F.relu(y))
        return self.grid_log_probs(m.output_params(h)), new

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

from .base import AutoregressiveConfig, AutoregressiveModel, ConfigError
from .layers import MaskedConv2d, check_group_multiple, gate


@dataclass
class GatedPixelCNNConfig(AutoregressiveConfig):
    hidden: int = 64  # features per stack (after the gate)
    layers: int = 8  # gated layers after the first
    first_kernel: int = 7
    kernel: int = 3
    output_hidden: int = 64

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1 or self.layers < 0 or self.output_hidden < 1:
            raise ConfigError(
                f"need hidden >= 1, layers >= 0, output_hidden >= 1; got {self.hidden}, {self.layers}, "
                f"{self.output_hidden}"
            )
        try:
            check_group_multiple(self.hidden, self.channels)
        except ValueError as e:
            raise ConfigError(str(e)) from None


class GatedLayer(nn.Module):
    """One gated layer of [1], figure 2. ``first``: mask A, no residual on the horizontal stack."""

    def __init__(
        self, in_features: int, hidden: int, kernel: int, groups: int, num_classes: int, *, first: bool
    ) -> None:
        super().__init__()
        mask = "A" if first else "B"
        self.first = first
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
        h_new = h_gated if self.h_out is None else h + self.h_out(h_gated)
        return v_new, h_new


class GatedPixelCNN(AutoregressiveModel):
    config: GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig) -> None:
        super().__init__(config)
        c, g = config, config.channels
        self.layers = nn.ModuleList(
            [GatedLayer(c.channels, c.hidden, c.first_kernel, g, c.num_classes, first=True)]
            + [GatedLayer(c.hidden, c.hidden, c.kernel, g, c.num_classes, first=False) for _ in range(c.layers)]
        )
        self.out1 = MaskedConv2d(c.hidden, c.output_hidden, 1, mask_type="B", groups=g)
        self.out2 = MaskedConv2d(c.output_hidden, self.out_features, 1, mask_type="B", groups=g)

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, labels)
        v = h = self.normalize(x)  # (B, C, H, W)
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.out2(F.relu(self.out1(F.relu(h))))  # (B, P * C, H, W)

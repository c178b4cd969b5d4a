"""Masked convolutions and gated activations shared by every autoregressive model.

[1]: van den Oord et al. 2016, Pixel Recurrent Neural Networks, https://arxiv.org/abs/1601.06759
     (section 3.4: masks A and B, the R -> G -> B sub-pixel ordering).
[2]: van den Oord et al. 2016, Conditional Image Generation with PixelCNN Decoders,
     https://arxiv.org/abs/1606.05328 (gated activation units, vertical and horizontal stacks).

Colour ordering: every feature map of a colour model is split into ``groups`` (3 for RGB, 1 for grey) by
``channel % groups``. A feature in group g at the kernel centre may read input features of groups < g
(mask A) or <= g (mask B). Rows above the centre, and the centre row left of the centre, are fully
connected; everything right of or below the centre is masked out. With ``groups == 1`` this reduces to the
plain spatial masks.

The mask is applied functionally (``weight * mask`` inside ``forward``), never by overwriting
``weight.data``: the exported graphs then carry the mask as a constant and gradients never touch the masked
taps.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MaskType = Literal["A", "B"]
# "full": the causal raster mask of [1]. "vertical": rows strictly above the centre (A) or up to and
# including the centre row (B), for the vertical stack of [2]. "horizontal": the centre row only.
MaskShape = Literal["full", "vertical", "horizontal"]


def channel_groups(n_features: int, groups: int) -> torch.Tensor:
    """Group index of each feature: ``feature % groups``."""
    return torch.arange(n_features) % groups


def causal_mask(
    mask_type: MaskType,
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    *,
    groups: int = 1,
    shape: MaskShape = "full",
) -> torch.Tensor:
    """The (out, in, kh, kw) 0/1 mask of a causal convolution; the kernel centre is (kh // 2, kw // 2)."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"masked convolutions need odd kernel sizes, got {kernel_size}")
    ch, cw = kh // 2, kw // 2
    mask = torch.zeros(out_channels, in_channels, kh, kw)
    if shape == "vertical":
        # The vertical stack never sees the current row's groups, so channel groups play no part.
        last_row = ch - 1 if mask_type == "A" else ch
        mask[:, :, : last_row + 1, :] = 1.0
        return mask
    if shape == "full":
        mask[:, :, :ch, :] = 1.0
    elif shape != "horizontal":
        raise ValueError(f"unknown mask shape {shape!r}")
    mask[:, :, ch, :cw] = 1.0
    g_out = channel_groups(out_channels, groups)[:, None]
    g_in = channel_groups(in_channels, groups)[None, :]
    centre = (g_in < g_out) if mask_type == "A" else (g_in <= g_out)
    mask[:, :, ch, cw] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded conv2d whose weight is multiplied by a causal mask on every call."""

    mask: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        mask_type: MaskType,
        groups: int = 1,
        shape: MaskShape = "full",
        bias: bool = True,
    ) -> None:
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, ks, padding=(ks[0] // 2, ks[1] // 2), bias=bias)
        self.mask_type = mask_type
        self.color_groups = groups
        self.mask_shape = shape
        self.register_buffer(
            "mask", causal_mask(mask_type, out_channels, in_channels, ks, groups=groups, shape=shape),
            persistent=False,
        )

    folded = False  # True once fold_mask() has multiplied the mask into the weight (exported graphs)

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.folded else self.weight * self.mask

    @torch.no_grad()
    def fold_mask(self) -> None:
        """Multiply the mask into the weight once, so a traced or exported graph holds the masked weight
        alone: no mask tensor beside it, no multiply per call. Exact: the product a call computes is this
        one (and masking a folded weight again changes nothing, the mask being 0/1).

        The folded weight is also laid out in memory as (kh, kw, in, out), seen through a permuted view: a
        cached step's matrix, the top rows of the kernel as (rows * kw * in, out) (models/incremental.py), is
        then a view of the same storage, so a frozen TorchScript archive stores the kernel once rather than
        the kernel and its transposed top half beside it (issue 25: 1.5x the weights before)."""
        if not self.folded:
            w = self.weight.detach() * self.mask
            self.weight.data = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            self.folded = True
            used = self.mask.flatten(0, 1).amax(0)  # (kh, kw): 1 where some output reads the tap
            rows, cols = used.amax(1).nonzero(), used.amax(0).nonzero()
            if len(rows) and (int(rows[-1]) + 1, int(cols[-1]) + 1) != tuple(used.shape):
                self.kept = (int(rows[-1]) + 1, int(cols[-1]) + 1)

    # (rows, cols): the top-left part of the kernel outside which the mask is zero, once folded, when smaller
    # than the kernel. A folded convolution then runs that part alone (issue 25): the taps it drops multiply
    # by zero, and on the CPU backends the sum of the others comes out bit for bit the same (the
    # decoder-equality tests compare); a 7x7 mask-A kernel keeps 4x7, a 3x3 mask-B kernel 2x3.
    kept: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and self.kept is not None:
            return self._forward_kept(x, *self.kept)
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)

    def _forward_kept(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        top, left = self.padding
        bottom, right = rows - 1 - top, cols - 1 - left  # negative: input rows (columns) no kept tap reads
        if bottom < 0:
            x = x[:, :, :bottom]
        if right < 0:
            x = x[:, :, :, :right]
        x = F.pad(x, (left, max(right, 0), top, max(bottom, 0)))
        return F.conv2d(x, self.weight[:, :, :rows, :cols], self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask={self.mask_type}, shape={self.mask_shape}, groups={self.color_groups}"


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation tanh(a) * sigmoid(b) where (a, b) are the two halves of the channel axis."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def check_group_multiple(n: int, groups: int) -> None:
    """Split gate halves keep the ``channel % groups`` pattern only when n is a multiple of groups."""
    if n % groups:
        raise ValueError(f"hidden channels ({n}) must be a multiple of the {groups} colour groups")

"""The table of fused whole-image decoders: which model (registry name) each serves, with which likelihood
heads, and its pack and decode functions. The Triton backend consults it rather than assuming: a model or
head without an entry decodes with its cached form in PyTorch on the same device.

A decoder's ``pack`` reads the network's layers (their names are the model's own: ``blocks``, ``v_conv``,
...); ``tests/test_triton.py`` runs every entry against the plain reference, which ties the two together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .gated_decode import decode_gated, pack_gated_pixelcnn
from .pixelcnn_decode import HEADS, decode, pack_pixelcnn


@dataclass(frozen=True)
class FusedDecoder:
    model: str  # the model registry's name
    likelihoods: tuple[str, ...]  # the heads the kernel samples from
    pack: Callable[..., Any]  # (model, device) -> packed weights
    decode: Callable[..., Any]  # (packed, u, labels=, prefix=, start_row=) -> levels (B, C, H, W)


FUSED_DECODERS: dict[str, FusedDecoder] = {
    d.model: d
    for d in (
        FusedDecoder("pixelcnn", tuple(HEADS), pack_pixelcnn, decode),
        FusedDecoder("gated-pixelcnn", tuple(HEADS), pack_gated_pixelcnn, decode_gated),
    )
}


def fused_decoder(model: str, likelihood: str | None) -> FusedDecoder | None:
    """The fused decoder for this model and head, or None (decode with the cached form instead)."""
    d = FUSED_DECODERS.get(model)
    return d if d is not None and likelihood in d.likelihoods else None

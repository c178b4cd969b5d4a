"""Fused cached decoding of a gated PixelCNN in Triton: one launch, one program per tile of whole images.

The same plan as ``pixelcnn_decode`` (read that first), for the two stacks of models/gated_pixelcnn.py:

- at the start of row i, the vertical stack of every layer along the whole row (it sees only rows above
  i, and rows of its own layer below it): v_pre = vertical conv, link = 1x1(v_pre) kept for the row,
  v = gate(v_pre + class bias) written into a ring of ``kernel // 2 + 1`` rows that the next layer reads;
- per sub-pixel, the horizontal stack: h_pre = horizontal conv over the current row of the layer below
  (the image for layer 0) + link + class bias, gated, plus the 1x1 residual after layer 0; each layer's
  output is written into a one-row buffer that the next layer reads left of and at the current column;
- then the output layers, head and sampling shared with ``pixelcnn_decode`` (``_emit_pixel``).

Masked convolutions gather their kept (tap, channel) pairs as in ``pixelcnn_decode._conv``; the 2h
pre-activations are kept as two halves (tanh part, sigmoid part), each padded to HP. ``decode_reference``
in pixelcnn_decode is the plain reference for both kernels.
"""

from __future__ import annotations

import torch

from .pixelcnn_decode import (
    HEADS,
    KC,
    PackedDecoder,
    _p2,
    _pack_head,
    _pad1,
    _pairs,
    _point,
    launch_inputs,
)

try:
    import triton
    import triton.language as tl

    from .pixelcnn_decode import _emit_pixel, _gather, _matvec, _sig
except ImportError:
    triton = None
    tl = None

NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def _gate(a, b):
        return (2.0 * _sig(2.0 * a) - 1.0) * _sig(b)  # tanh(a) * sigmoid(b)

    @triton.jit
    def _halves(a, w_ptr, K: tl.constexpr, HP: tl.constexpr):
        """a (BB, K) @ W (K, 2HP) as its (tanh, sigmoid) halves."""
        return _matvec(a, w_ptr, K, HP, 2 * HP), _matvec(a, w_ptr + HP, K, HP, 2 * HP)

    @triton.jit
    def _conv_halves(src_ptr, base, dy_ptr, dx_ptr, c_ptr, w_ptr, K, i, j, W, b_ok,
                     C_STRIDE, ROW_STRIDE, COL_OFF, RING: tl.constexpr, NORMALIZE: tl.constexpr,
                     LEVELS: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr, HP: tl.constexpr,
                     BLOCK_B: tl.constexpr):
        """``pixelcnn_decode._conv`` with W (KP, 2HP) as (tanh, sigmoid) halves: one gather, two products."""
        acc_a = tl.zeros((BLOCK_B, HP), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_B, HP), dtype=tl.float32)
        for k0 in range(0, KP, KC):
            v = _gather(src_ptr, base, dy_ptr, dx_ptr, c_ptr, k0 + tl.arange(0, KC), K, i, j, W, b_ok, C_STRIDE,
                        ROW_STRIDE, COL_OFF, RING, NORMALIZE, LEVELS)
            acc_a += _matvec(v, w_ptr + k0 * 2 * HP, KC, HP, 2 * HP)
            acc_b += _matvec(v, w_ptr + k0 * 2 * HP + HP, KC, HP, 2 * HP)
        return acc_a, acc_b

    @triton.jit
    def _gated_decode_kernel(
        x_ptr,  # (B, C, H, W) float32 levels: zero at start (or the kept prefix)
        u_ptr,  # (B, H, W, C) float64 uniforms
        lab_ptr,  # (B,) int64 labels, read only if HAS_LABELS
        vring_ptr,  # (B, N, HP, R, W + 2 * PAD) rings of each layer's vertical output
        link_ptr,  # (B, N, 2 * HP, W) each layer's link along the current row
        hrow_ptr,  # (B, N, HP, W) each layer's horizontal output along the current row
        p_ptr,  # (B, C, H, W, KP) level probabilities, written only if STORE_PROBS
        wv0_ptr, dyv0_ptr, dxv0_ptr, cv0_ptr,  # layer 0 vertical: (KV0P, 2HP) over (tap, channel) pairs of x
        wv_ptr, dyv_ptr, dxv_ptr, cv_ptr,  # layers >= 1 vertical: (N - 1, KVP, 2HP) over pairs of v below
        wh0_ptr, dyh0_ptr, dxh0_ptr, ch0_ptr,  # layer 0 horizontal: (KH0P, 2HP) over pairs of x's current row
        wh_ptr, dyh_ptr, dxh_ptr, chh_ptr,  # layers >= 1 horizontal: (N - 1, KHP, 2HP) over pairs of h below
        bv_ptr, bh_ptr,  # (N, 2HP) biases of the two convolutions
        wl_ptr, bl_ptr,  # link 1x1: (N, 2HP, 2HP), (N, 2HP)
        emb_ptr,  # (N, classes, 2HP) class biases, read only if HAS_LABELS
        wo_ptr, bo_ptr,  # residual 1x1 after layer 0: (N - 1, HP, HP), (N - 1, HP)
        w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # output layers and head, as in pixelcnn_decode
        B, H, W, KV0, KV, KH0, KH, START_ROW, CLASSES,
        C: tl.constexpr, N: tl.constexpr, R: tl.constexpr, PAD: tl.constexpr, LEVELS: tl.constexpr,
        HEAD: tl.constexpr, G: tl.constexpr, NMIX: tl.constexpr, HAS_LABELS: tl.constexpr,
        HP: tl.constexpr, OP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
        KV0P: tl.constexpr, KVP: tl.constexpr, KH0P: tl.constexpr, KHP: tl.constexpr,
        KCV0: tl.constexpr, KCV: tl.constexpr, KCH0: tl.constexpr, KCH: tl.constexpr,  # pairs per product
        BLOCK_B: tl.constexpr, STORE_PROBS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = rb < B
        rh = tl.arange(0, HP)
        hw = H * W
        WS = W + 2 * PAD
        HP2: tl.constexpr = 2 * HP
        lab = tl.load(lab_ptr + rb, mask=b_ok & HAS_LABELS, other=0)
        v_base = rb[:, None] * (N * HP * R * WS) + rh[None, :] * (R * WS)  # (BB, HP): layer 0's ring
        l_base = rb[:, None] * (N * HP2 * W) + rh[None, :] * W  # (BB, HP): layer 0's link, tanh half
        h_base = rb[:, None] * (N * HP * W) + rh[None, :] * W  # (BB, HP): layer 0's row
        x_base = rb[:, None] * (C * hw)
        for i in range(0, H):
            # ---- the vertical stack along row i, layer by layer
            for layer in range(N):
                for jv in range(0, W):
                    if layer == 0:  # vertical mask A over the image rows above i
                        pa, pb = _conv_halves(x_ptr, x_base, dyv0_ptr, dxv0_ptr, cv0_ptr, wv0_ptr, KV0, i, jv, W, b_ok,
                                              hw, W, 0, 0, True, LEVELS, KV0P, KCV0, HP, BLOCK_B)
                    else:  # vertical mask B over the ring of the layer below (rows i - PAD .. i)
                        below = rb[:, None] * (N * HP * R * WS) + (layer - 1) * (HP * R * WS)
                        pa, pb = _conv_halves(vring_ptr, below, dyv_ptr, dxv_ptr, cv_ptr,
                                              wv_ptr + (layer - 1) * KVP * HP2, KV, i, jv, W, b_ok,
                                              R * WS, WS, PAD, R, False, LEVELS, KVP, KCV, HP, BLOCK_B)
                    pa += tl.load(bv_ptr + layer * HP2 + rh)[None, :]
                    pb += tl.load(bv_ptr + layer * HP2 + HP + rh)[None, :]
                    wl = wl_ptr + layer * HP2 * HP2  # link = [pa, pb] @ (2HP, 2HP), in four blocks
                    la = _matvec(pa, wl, HP, HP, HP2) + _matvec(pb, wl + HP * HP2, HP, HP, HP2)
                    lb = _matvec(pa, wl + HP, HP, HP, HP2) + _matvec(pb, wl + HP * HP2 + HP, HP, HP, HP2)
                    la += tl.load(bl_ptr + layer * HP2 + rh)[None, :]
                    lb += tl.load(bl_ptr + layer * HP2 + HP + rh)[None, :]
                    lo = l_base + layer * (HP2 * W) + jv
                    tl.store(link_ptr + lo, la, mask=b_ok[:, None])
                    tl.store(link_ptr + lo + HP * W, lb, mask=b_ok[:, None])
                    if HAS_LABELS:
                        pa += tl.load(emb_ptr + (layer * CLASSES + lab[:, None]) * HP2 + rh[None, :])
                        pb += tl.load(emb_ptr + (layer * CLASSES + lab[:, None]) * HP2 + HP + rh[None, :])
                    tl.store(vring_ptr + v_base + layer * (HP * R * WS) + (i % R) * WS + jv + PAD, _gate(pa, pb),
                             mask=b_ok[:, None])
                tl.debug_barrier()
            # ---- the horizontal stack, sub-pixel by sub-pixel
            for j in range(0, W):
                for kc in range(0, C):
                    pa, pb = _conv_halves(x_ptr, x_base, dyh0_ptr, dxh0_ptr, ch0_ptr, wh0_ptr, KH0, i, j, W, b_ok,
                                          hw, W, 0, 0, True, LEVELS, KH0P, KCH0, HP, BLOCK_B)
                    h = tl.zeros((BLOCK_B, HP), dtype=tl.float32)
                    for layer in range(N):
                        if layer > 0:  # horizontal mask B over the row of the layer below, up to column j
                            below = rb[:, None] * (N * HP * W) + (layer - 1) * (HP * W)
                            pa, pb = _conv_halves(hrow_ptr, below, dyh_ptr, dxh_ptr, chh_ptr,
                                                  wh_ptr + (layer - 1) * KHP * HP2, KH, 0, j, W, b_ok,
                                                  W, 0, 0, 0, False, LEVELS, KHP, KCH, HP, BLOCK_B)
                        lo = l_base + layer * (HP2 * W) + j
                        pa += tl.load(bh_ptr + layer * HP2 + rh)[None, :] + tl.load(link_ptr + lo, mask=b_ok[:, None])
                        pb += tl.load(bh_ptr + layer * HP2 + HP + rh)[None, :] + tl.load(
                            link_ptr + lo + HP * W, mask=b_ok[:, None])
                        if HAS_LABELS:
                            pa += tl.load(emb_ptr + (layer * CLASSES + lab[:, None]) * HP2 + rh[None, :])
                            pb += tl.load(emb_ptr + (layer * CLASSES + lab[:, None]) * HP2 + HP + rh[None, :])
                        g = _gate(pa, pb)
                        if layer == 0:
                            h = g
                        else:
                            h += _matvec(g, wo_ptr + (layer - 1) * HP * HP, HP, HP, HP)
                            h += tl.load(bo_ptr + (layer - 1) * HP + rh)[None, :]
                        tl.store(hrow_ptr + h_base + layer * (HP * W) + j, h, mask=b_ok[:, None])
                        tl.debug_barrier()
                    _emit_pixel(h, w1_ptr, b1_ptr, w2_ptr, b2_ptr, x_ptr, u_ptr, p_ptr, rb, b_ok, i, j, kc, H, W,
                                START_ROW, C, LEVELS, HEAD, G, NMIX, HP, OP, NP, KP, BLOCK_B, STORE_PROBS)
                    tl.debug_barrier()


# ---------------------------------------------------------------- packing and launch


def _halves_pad(w: torch.Tensor | None, rows: int, hidden: int, HP: int) -> torch.Tensor:
    """(K, 2h) -> (rows, 2HP): the tanh half at [0, h), the sigmoid half at [HP, HP + h)."""
    out = torch.zeros(rows, 2 * HP)
    if w is not None:
        w = w.detach().float().reshape(-1, 2 * hidden)
        out[: w.shape[0], :hidden] = w[:, :hidden]
        out[: w.shape[0], HP : HP + hidden] = w[:, hidden:]
    return out


def pack_gated_pixelcnn(model: torch.nn.Module, device: torch.device | str = "cpu") -> PackedDecoder:
    """Gather a gated PixelCNN's masked weights into the padded float32 layout the kernel reads."""
    c = model.config
    h, HP = c.hidden, _p2(c.hidden)
    layers = list(model.layers)
    N = len(layers)

    def conv_pack(convs: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor, int]:
        packs = [_pairs(conv) for conv in convs]
        if not packs:
            return torch.zeros(1, 16, 2 * HP), torch.zeros(3, 16, dtype=torch.int32), 0
        k = packs[0][2]
        kp = packs[0][1].shape[1]
        return torch.stack([_halves_pad(w, kp, h, HP) for w, _, _ in packs]), packs[0][1], k

    wv0, pv0, KV0 = conv_pack([layers[0].v_conv])
    wh0, ph0, KH0 = conv_pack([layers[0].h_conv])
    wv, pv, KV = conv_pack([layer.v_conv for layer in layers[1:]])
    wh, phh, KH = conv_pack([layer.h_conv for layer in layers[1:]])

    def link(layer: torch.nn.Module) -> torch.Tensor:  # (2h in, 2h out) -> (2HP, 2HP) in halves both ways
        w = layer.link.weight.detach()[:, :, 0, 0].t().float()  # (in, out)
        rows = _halves_pad(w, 2 * h, h, HP)  # output halves placed; now place the input halves
        out = torch.zeros(2 * HP, 2 * HP)
        out[:h], out[HP : HP + h] = rows[:h], rows[h:]
        return out

    classes = c.num_classes
    emb = torch.stack([_halves_pad(layer.cond.weight if layer.cond is not None else None, max(classes, 1), h, HP)
                       for layer in layers])
    head, head_meta = _pack_head(model, HP)
    tensors = {
        "wv0": wv0[0], "dyv0": pv0[0], "dxv0": pv0[1], "cv0": pv0[2],
        "wv": wv, "dyv": pv[0], "dxv": pv[1], "cv": pv[2],
        "wh0": wh0[0], "dyh0": ph0[0], "dxh0": ph0[1], "ch0": ph0[2],
        "wh": wh, "dyh": phh[0], "dxh": phh[1], "chh": phh[2],
        "bv": torch.stack([_halves_pad(layer.v_conv.bias, 1, h, HP)[0] for layer in layers]),
        "bh": torch.stack([_halves_pad(layer.h_conv.bias, 1, h, HP)[0] for layer in layers]),
        "wl": torch.stack([link(layer) for layer in layers]),
        "bl": torch.stack([_halves_pad(layer.link.bias, 1, h, HP)[0] for layer in layers]),
        "emb": emb,
        "wo": torch.stack([_point(layer.h_out, HP, HP) for layer in layers[1:]]) if N > 1 else torch.zeros(1, HP, HP),
        "bo": torch.stack([_pad1(layer.h_out.bias, HP) for layer in layers[1:]]) if N > 1 else torch.zeros(1, HP),
        **head,
    }
    kernel = layers[1].v_conv.kernel_size[0] if N > 1 else 1
    meta = {**head_meta, "N": N, "R": kernel // 2 + 1, "PAD": kernel // 2, "HP": HP, "KV0": KV0, "KV": KV,
            "KH0": KH0, "KH": KH, "KV0P": pv0.shape[1], "KVP": pv.shape[1], "KH0P": ph0.shape[1], "KHP": phh.shape[1]}
    for name in ("V0", "V", "H0", "H"):  # pairs per product (see pixelcnn_decode._conv)
        meta[f"KC{name}"] = min(KC, meta[f"K{name}P"])
    return PackedDecoder.on(tensors, meta, device)


_CONSTEXPRS = ("C", "N", "R", "PAD", "LEVELS", "HEAD", "G", "NMIX", "HP", "OP", "NP", "KP", "KV0P", "KVP", "KH0P",
               "KHP", "KCV0", "KCV", "KCH0", "KCH")
_WEIGHTS = ("wv0", "dyv0", "dxv0", "cv0", "wv", "dyv", "dxv", "cv", "wh0", "dyh0", "dxh0", "ch0", "wh", "dyh", "dxh",
            "chh", "bv", "bh", "wl", "bl", "emb", "wo", "bo", "w1", "b1", "w2", "b2")  # in the kernel's argument order


def decode_gated(
    packed: PackedDecoder,
    u: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    start_row: int = 0,
    block_b: int = 16,
    return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``pixelcnn_decode.decode`` for a gated PixelCNN: u (B, H, W, C) float64 -> float32 levels (B, C, H, W)."""
    x, u, lab, probs, grid, start = launch_inputs(packed, u, labels, prefix, start_row, block_b, return_probs)
    m, t = packed.meta, packed.tensors
    b, N, HP, W = x.shape[0], m["N"], m["HP"], m["W"]
    f32 = dict(dtype=torch.float32, device=x.device)
    vring = torch.zeros(b, N, HP, m["R"], W + 2 * m["PAD"], **f32)
    link = torch.zeros(b, N, 2 * HP, W, **f32)
    hrow = torch.zeros(b, N, HP, W, **f32)
    _gated_decode_kernel[grid](
        x, u, lab, vring, link, hrow, probs,
        *(t[k] for k in _WEIGHTS),
        b, m["H"], W, m["KV0"], m["KV"], m["KH0"], m["KH"], start, max(m["classes"], 1),
        HAS_LABELS=labels is not None, BLOCK_B=block_b, STORE_PROBS=return_probs,
        **{k: m[k] for k in _CONSTEXPRS}, num_warps=NUM_WARPS,
    )
    return (x, probs[..., : m["LEVELS"]]) if return_probs else x


__all__ = ["HEADS", "decode_gated", "pack_gated_pixelcnn"]

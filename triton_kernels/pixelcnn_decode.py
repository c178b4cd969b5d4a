"""Fused cached decoding of a PixelCNN in Triton: one launch decodes whole images, one program per tile.

Per sub-pixel the cached step (models/incremental.py) is a chain of small matrix products; built from
dozens of launches it would be launch-bound. Here one program owns BLOCK_B images and loops over every
pixel, channel and layer itself, sampling each sub-pixel from its pre-drawn uniform by inverse CDF, so an
image costs one program whatever its size, and a batch one launch of ``tiles(batch)`` programs.

State, per program:
- the image being generated (the output, float levels), read back through the 7x7 mask-A taps;
- for each residual block, a ring of ``k // 2 + 1`` rows of the block's kxk input (the cache of
  Ramachandran et al. 2017), in a global scratch tensor; only the taps the mask keeps are read, so slots
  right of or below the current position are never looked at and need no clearing.

Each masked convolution gathers its kept (tap, input channel) pairs and multiplies them by the weight packed
as a (pairs, out) matrix, 64 pairs per product (``_conv``): a chain of per-tap products would put one
dependent global load and one small dot after another on the critical path of every pixel, and latency, not
arithmetic, bounds this kernel; larger tiles spill registers. Widths are padded to powers of two >= 16
(``tl.dot``'s minimum) with zero weights. All arithmetic is float32; the uniforms stay float64 for the final
comparison. See ``decode_reference`` for the same function in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masked_conv import PackedConv, pack_masked_conv

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HEADS = {"bernoulli": 0, "categorical": 1, "logistic-mixture": 2}


def _p2(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


if triton is not None:

    @triton.jit
    def _sig(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _matvec(a, w_ptr, K: tl.constexpr, N: tl.constexpr, ROW: tl.constexpr):
        """a (BB, K) @ W (K, N) with W row-major at w_ptr (row stride ROW), in true float32: the GPU default
        (tf32) would move samples off the other backends' (see masked_conv.dot_precision)."""
        rk = tl.arange(0, K)
        rn = tl.arange(0, N)
        w = tl.load(w_ptr + rk[:, None] * ROW + rn[None, :])
        return tl.dot(a, w, input_precision="ieee")

    @triton.jit
    def _gather(src_ptr, base, dy_ptr, dx_ptr, c_ptr, rk, K, i, j, W, b_ok, C_STRIDE, ROW_STRIDE, COL_OFF,
                RING: tl.constexpr, NORMALIZE: tl.constexpr, LEVELS: tl.constexpr):
        """Values (BB, len(rk)) of the source at the kept (tap, channel) pairs rk of a masked conv centred on
        (i, j): pair p reads channel c[p] at row i + dy[p], column j + dx[p] (zero outside the image or past
        the K pairs). Per image the source starts at ``base`` (BB, 1); a channel spans C_STRIDE, a row
        ROW_STRIDE; RING > 0: rows live in a ring of RING rows; NORMALIZE: image levels -> [-1, 1]."""
        y = i + tl.load(dy_ptr + rk)
        x = j + tl.load(dx_ptr + rk)
        ok = (rk < K) & (y >= 0) & (x >= 0) & (x < W)
        if RING > 0:
            y = y % RING
        off = tl.load(c_ptr + rk) * C_STRIDE + y * ROW_STRIDE + x + COL_OFF
        v = tl.load(src_ptr + base + off[None, :], mask=b_ok[:, None] & ok[None, :], other=0.0)
        if NORMALIZE:
            v = tl.where(ok[None, :], v * (2.0 / (LEVELS - 1)) - 1.0, 0.0)
        return v

    @triton.jit
    def _conv(src_ptr, base, dy_ptr, dx_ptr, c_ptr, w_ptr, K, i, j, W, b_ok, C_STRIDE, ROW_STRIDE, COL_OFF,
              RING: tl.constexpr, NORMALIZE: tl.constexpr, LEVELS: tl.constexpr, KP: tl.constexpr,
              KC: tl.constexpr, N: tl.constexpr, BLOCK_B: tl.constexpr):
        """A masked conv at (i, j): the gathered pairs (see _gather) times W (KP, N), KC pairs at a time so
        that neither tile outgrows the registers (one 256-pair tile spilled kilobytes in ptxas)."""
        acc = tl.zeros((BLOCK_B, N), dtype=tl.float32)
        for k0 in range(0, KP, KC):
            rk = k0 + tl.arange(0, KC)
            v = _gather(src_ptr, base, dy_ptr, dx_ptr, c_ptr, rk, K, i, j, W, b_ok, C_STRIDE, ROW_STRIDE, COL_OFF,
                        RING, NORMALIZE, LEVELS)
            acc += _matvec(v, w_ptr + k0 * N, KC, N, N)
        return acc

    @triton.jit
    def _emit_pixel(h, w1_ptr, b1_ptr, w2_ptr, b2_ptr, x_ptr, u_ptr, p_ptr, rb, b_ok, i, j, kc, H, W, START_ROW,
                    C: tl.constexpr, LEVELS: tl.constexpr, HEAD: tl.constexpr, G: tl.constexpr, NMIX: tl.constexpr,
                    HP: tl.constexpr, OP: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr,
                    STORE_PROBS: tl.constexpr):
        """The output layers and head of sub-pixel (i, j, kc) from the last hidden state h (BB, HP): sample it
        from its pre-drawn uniform by inverse CDF and store it (and its distribution if STORE_PROBS)."""
        hw = H * W
        zero_b = rb * 0
        ro = tl.arange(0, OP)
        rn = tl.arange(0, NP)
        rk = tl.arange(0, KP)
        kf = rk.to(tl.float32)
        half = 1.0 / (LEVELS - 1)
        upper = (2.0 * kf + 1.0) * half - 1.0  # upper bin edge of each level
        lower = upper - 2.0 * half
        o = _matvec(tl.maximum(h, 0.0), w1_ptr, HP, OP, OP) + tl.load(b1_ptr + ro)[None, :]
        o = tl.maximum(o, 0.0)
        # ---- the head of channel kc: level probabilities (BB, KP), unnormalized
        q_base = w2_ptr + kc * G * OP * NP
        qb = b2_ptr + kc * G * NP
        if HEAD == 0:  # bernoulli: one logit
            q = _matvec(o, q_base, OP, NP, NP) + tl.load(qb + rn)[None, :]
            logit = tl.sum(tl.where(rn[None, :] == 0, q, 0.0), axis=1)
            p1 = _sig(logit)
            probs = tl.where(rk[None, :] == 1, p1[:, None], 0.0)
            probs = tl.where(rk[None, :] == 0, 1.0 - p1[:, None], probs)
        elif HEAD == 1:  # categorical: K logits
            q = _matvec(o, q_base, OP, NP, NP) + tl.load(qb + rn)[None, :]
            q = tl.where(rn[None, :] < LEVELS, q, float("-inf"))
            probs = tl.exp(q - tl.max(q, axis=1)[:, None])
        else:  # logistic mixture: groups (logits, means, log-scales), NMIX components each
            pi = _matvec(o, q_base, OP, NP, NP) + tl.load(qb + rn)[None, :]
            mu = _matvec(o, q_base + OP * NP, OP, NP, NP) + tl.load(qb + NP + rn)[None, :]
            ls = _matvec(o, q_base + 2 * OP * NP, OP, NP, NP) + tl.load(qb + 2 * NP + rn)[None, :]
            pi = tl.where(rn[None, :] < NMIX, pi, float("-inf"))
            wts = tl.exp(pi - tl.max(pi, axis=1)[:, None])
            wts = wts / tl.sum(wts, axis=1)[:, None]
            inv_s = tl.exp(-tl.maximum(ls, -7.0))
            probs = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
            for m in range(NMIX):
                sel = rn[None, :] == m
                mu_m = tl.sum(tl.where(sel, mu, 0.0), axis=1)[:, None]
                is_m = tl.sum(tl.where(sel, inv_s, 0.0), axis=1)[:, None]
                w_m = tl.sum(tl.where(sel, wts, 0.0), axis=1)[:, None]
                cdf_hi = tl.where(rk[None, :] >= LEVELS - 1, 1.0, _sig((upper[None, :] - mu_m) * is_m))
                cdf_lo = tl.where(rk[None, :] == 0, 0.0, _sig((lower[None, :] - mu_m) * is_m))
                probs += w_m * (cdf_hi - cdf_lo)
            probs = tl.where(rk[None, :] < LEVELS, probs, 0.0)
        # ---- inverse CDF with the pre-drawn uniform, as runtime/decoding.py does
        cdf = tl.cumsum(probs, axis=1)
        total = tl.sum(probs, axis=1)
        u = tl.load(u_ptr + rb * (hw * C) + (i * W + j) * C + kc, mask=b_ok, other=0.0)
        target = u * total.to(tl.float64)
        below = (cdf.to(tl.float64) <= target[:, None]) & (rk[None, :] < LEVELS - 1)
        level = tl.sum(below.to(tl.int32), axis=1)
        if STORE_PROBS:  # for tests: the distribution each sample was drawn from
            p_off = ((rb * C + kc) * hw + i * W + j) * KP
            tl.store(p_ptr + p_off[:, None] + rk[None, :], probs / total[:, None], mask=b_ok[:, None])
        tl.store(x_ptr + rb * (C * hw) + kc * hw + i * W + j, level.to(tl.float32),
                 mask=b_ok & ((zero_b + i) >= START_ROW))

    @triton.jit
    def _pixelcnn_decode_kernel(
        x_ptr,  # (B, C, H, W) float32: the images being generated, zero at start (or the kept prefix)
        u_ptr,  # (B, H, W, C) float64 uniforms
        lab_ptr,  # (B,) int64 labels, read only if HAS_LABELS
        scratch_ptr,  # (B, L, IP, R, W + 2 * PAD) float32 ring buffers of the blocks' kxk inputs
        p_ptr,  # (B, C, H, W, KP) float32 level probabilities, written only if STORE_PROBS
        w0_ptr, dy0_ptr, dx0_ptr, c0_ptr, b0_ptr,  # input conv: (K0P, HP) over (tap, channel) pairs, (HP,)
        emb_ptr,  # (classes, HP) label embedding
        wr_ptr, br_ptr,  # reduce 1x1: (L, HP, IP), (L, IP)
        wc_ptr, dy1_ptr, dx1_ptr, c1_ptr, bc_ptr,  # block kxk: (L, K1P, IP) over (tap, channel) pairs, (L, IP)
        we_ptr, be_ptr,  # expand 1x1: (L, IP, HP), (L, HP)
        w1_ptr, b1_ptr,  # out1: (HP, OP), (OP,)
        w2_ptr, b2_ptr,  # out2 per channel and head parameter group: (C, G, OP, NP), (C, G, NP)
        B, H, W, K0, K1, START_ROW,
        C: tl.constexpr, L: tl.constexpr, R: tl.constexpr, PAD: tl.constexpr, LEVELS: tl.constexpr,
        HEAD: tl.constexpr, G: tl.constexpr, NMIX: tl.constexpr, HAS_LABELS: tl.constexpr,
        HP: tl.constexpr, IP: tl.constexpr, OP: tl.constexpr, NP: tl.constexpr,
        KP: tl.constexpr, K0P: tl.constexpr, K1P: tl.constexpr, KC0: tl.constexpr, KC1: tl.constexpr,
        BLOCK_B: tl.constexpr, STORE_PROBS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = rb < B
        rh = tl.arange(0, HP)
        ri = tl.arange(0, IP)
        hw = H * W
        WS = W + 2 * PAD  # one scratch row
        s_base = rb[:, None] * (L * IP * R * WS)  # (BB, 1)
        x_base = rb[:, None] * (C * hw)
        if HAS_LABELS:
            lab = tl.load(lab_ptr + rb, mask=b_ok, other=0)
            emb = tl.load(emb_ptr + lab[:, None] * HP + rh[None, :])
        for i in range(0, H):  # rows above START_ROW are kept: computed (to fill the caches), not sampled
            for j in range(0, W):
                for kc in range(0, C):
                    # ---- input convolution (mask A) over the kept (tap, channel) pairs of the image so far
                    h = _conv(x_ptr, x_base, dy0_ptr, dx0_ptr, c0_ptr, w0_ptr, K0, i, j, W, b_ok, hw, W, 0, 0, True,
                              LEVELS, K0P, KC0, HP, BLOCK_B) + tl.load(b0_ptr + rh)[None, :]
                    if HAS_LABELS:
                        h += emb
                    # ---- residual blocks
                    for layer in range(L):
                        y = _matvec(tl.maximum(h, 0.0), wr_ptr + layer * HP * IP, HP, IP, IP)
                        y = tl.maximum(y + tl.load(br_ptr + layer * IP + ri)[None, :], 0.0)
                        l_base = s_base + layer * (IP * R * WS) + ri[None, :] * (R * WS)
                        tl.store(scratch_ptr + l_base + (i % R) * WS + j + PAD, y, mask=b_ok[:, None])
                        tl.debug_barrier()
                        # the kxk conv over the ring of this block's inputs (rows i - PAD .. i)
                        z = _conv(scratch_ptr, s_base + layer * (IP * R * WS), dy1_ptr, dx1_ptr, c1_ptr,
                                  wc_ptr + layer * K1P * IP, K1, i, j, W, b_ok, R * WS, WS, PAD, R, False, LEVELS,
                                  K1P, KC1, IP, BLOCK_B)
                        z = tl.maximum(z + tl.load(bc_ptr + layer * IP + ri)[None, :], 0.0)
                        h += _matvec(z, we_ptr + layer * IP * HP, IP, HP, HP)
                        h += tl.load(be_ptr + layer * HP + rh)[None, :]
                    _emit_pixel(h, w1_ptr, b1_ptr, w2_ptr, b2_ptr, x_ptr, u_ptr, p_ptr, rb, b_ok, i, j, kc, H, W,
                                START_ROW, C, LEVELS, HEAD, G, NMIX, HP, OP, NP, KP, BLOCK_B, STORE_PROBS)
                    tl.debug_barrier()


# ---------------------------------------------------------------- packing and launch


@dataclass
class PackedDecoder:
    """A model's weights in the padded float32 layout of its fused decode kernel, and the sizes it needs."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, int]

    @classmethod
    def on(cls, tensors: dict[str, torch.Tensor], meta: dict[str, int], device: torch.device | str) -> PackedDecoder:
        return cls({k: v.contiguous().to(device) for k, v in tensors.items()}, meta)


def _pad2(w: torch.Tensor | None, r: int, k: int) -> torch.Tensor:
    out = torch.zeros(r, k)
    if w is not None:
        out[: w.shape[0], : w.shape[1]] = w.detach().float()
    return out


def _pad1(v: torch.Tensor | None, n: int) -> torch.Tensor:
    out = torch.zeros(n)
    if v is not None:
        out[: v.shape[0]] = v.detach().float()
    return out


def _point(conv: torch.nn.Module, r: int, k: int) -> torch.Tensor:
    """A 1x1 (masked) convolution as a padded (in, out) matrix."""
    w = conv.masked_weight() if hasattr(conv, "masked_weight") else conv.weight
    return _pad2(w[:, :, 0, 0].t(), r, k)


def _pairs(conv: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A masked conv as one (tap, input channel) x out matrix over its kept taps, and the (dy, dx, channel) of
    each row, padded to a power of two (padding rows are masked off in the kernel by the returned count)."""
    p: PackedConv = pack_masked_conv(conv.weight.detach(), conv.mask, conv.bias)
    channels = conv.in_channels
    k = p.taps * channels
    rows = torch.zeros(3, _p2(k), dtype=torch.int32)
    rows[0, :k] = p.dy.cpu().repeat_interleave(channels)
    rows[1, :k] = p.dx.cpu().repeat_interleave(channels)
    rows[2, :k] = torch.arange(channels, dtype=torch.int32).repeat(p.taps)
    return p.weight.detach().reshape(k, -1).float().cpu(), rows, k


def _pack_head(model: torch.nn.Module, HP: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """out1 and out2 (per channel and head parameter group) for ``_emit_pixel``."""
    c = model.config
    head = HEADS[c.likelihood]
    C, oh = c.channels, c.output_hidden
    G = 3 if head == 2 else 1
    per_group = model.head.params_per_channel // G
    OP, NP = _p2(oh), _p2(per_group)
    out1, out2 = model.output_layers()
    w2 = out2.masked_weight()[:, :, 0, 0].detach()  # (P * C, OH), rows laid out (P, C)
    b2 = out2.bias.detach()
    w2p = torch.zeros(C, G, OP, NP)
    b2p = torch.zeros(C, G, NP)
    for ch in range(C):
        for g in range(G):
            rows = [(g * per_group + p) * C + ch for p in range(per_group)]
            w2p[ch, g, :oh, :per_group] = w2[rows].t().float()
            b2p[ch, g, :per_group] = b2[rows].float()
    tensors = {"w1": _point(out1, HP, OP), "b1": _pad1(out1.bias, OP), "w2": w2p, "b2": b2p}
    meta = {"C": C, "LEVELS": c.levels, "HEAD": head, "G": G, "NMIX": c.n_mix if head == 2 else 1, "OP": OP,
            "NP": NP, "KP": _p2(c.levels), "H": c.height, "W": c.width, "classes": c.num_classes}
    return tensors, meta


def pack_pixelcnn(model: torch.nn.Module, device: torch.device | str = "cpu") -> PackedDecoder:
    """Gather a PixelCNN's masked weights into the padded float32 layout the kernel reads."""
    c = model.config
    inner = model.blocks[0].conv.in_channels if len(model.blocks) else 1
    HP, IP = _p2(c.hidden), _p2(inner)
    w0, pairs0, K0 = _pairs(model.input_conv)
    K0P = pairs0.shape[1]
    blocks = list(model.blocks)
    L = len(blocks)
    if L:
        packed = [_pairs(b.conv) for b in blocks]
        pairs1, K1 = packed[0][1], packed[0][2]
        K1P = pairs1.shape[1]
        wc = torch.stack([_pad2(w, K1P, IP) for w, _, _ in packed])
        kernel = blocks[0].conv.kernel_size[0]
    else:
        K1, K1P, kernel = 0, 16, 1
        pairs1 = torch.zeros(3, K1P, dtype=torch.int32)
        wc = torch.zeros(1, K1P, IP)
    emb = model.label_embedding.weight if model.label_embedding is not None else None
    head, head_meta = _pack_head(model, HP)
    tensors = {
        "w0": _pad2(w0, K0P, HP), "dy0": pairs0[0], "dx0": pairs0[1], "c0": pairs0[2],
        "b0": _pad1(model.input_conv.bias, HP),
        "emb": _pad2(emb, emb.shape[0], HP) if emb is not None else torch.zeros(1, HP),
        "wr": torch.stack([_point(b.reduce, HP, IP) for b in blocks]) if L else torch.zeros(1, HP, IP),
        "br": torch.stack([_pad1(b.reduce.bias, IP) for b in blocks]) if L else torch.zeros(1, IP),
        "wc": wc, "dy1": pairs1[0], "dx1": pairs1[1], "c1": pairs1[2],
        "bc": torch.stack([_pad1(b.conv.bias, IP) for b in blocks]) if L else torch.zeros(1, IP),
        "we": torch.stack([_point(b.expand, IP, HP) for b in blocks]) if L else torch.zeros(1, IP, HP),
        "be": torch.stack([_pad1(b.expand.bias, HP) for b in blocks]) if L else torch.zeros(1, HP),
        **head,
    }
    meta = {**head_meta, "L": L, "R": kernel // 2 + 1, "PAD": kernel // 2, "K0P": K0P, "K1P": K1P, "HP": HP,
            "IP": IP, "K0": K0, "K1": K1, "KC0": min(K0P, KC), "KC1": min(K1P, KC)}
    return PackedDecoder.on(tensors, meta, device)


# Compiled for sm_90 (tests/triton_aot.py) the benchmark model's kernel needs ~255 registers a thread at 4 warps
# and spills ~270 bytes; at 8 warps it spills 4 bytes. One program per SM runs anyway, so more warps cost nothing.
NUM_WARPS = 8
KC = 64  # (tap, channel) pairs per product in _conv
_CONSTEXPRS = ("C", "L", "R", "PAD", "LEVELS", "HEAD", "G", "NMIX", "K0P", "K1P", "HP", "IP", "OP", "NP", "KP", "KC0",
               "KC1")
_WEIGHTS = ("w0", "dy0", "dx0", "c0", "b0", "emb", "wr", "br", "wc", "dy1", "dx1", "c1", "bc", "we", "be", "w1", "b1",
            "w2", "b2")  # in the kernel's argument order


def tiles(batch: int, block_b: int = 16) -> int:
    """Programs in the one launch that decodes a batch: one per tile of block_b images, for whole images."""
    return -(-batch // block_b)


def launch_inputs(
    packed: PackedDecoder, u: torch.Tensor, labels: torch.Tensor | None, prefix: torch.Tensor | None,
    start_row: int, block_b: int, return_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int], int]:
    """What every decode kernel takes besides its weights and scratch, after checking the arguments:
    images x (with the kept prefix rows), uniforms, labels, the probability output, grid and start row."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    m = packed.meta
    b = u.shape[0]
    if tuple(u.shape[1:]) != (m["H"], m["W"], m["C"]):
        raise ValueError(f"uniforms must be (B, {m['H']}, {m['W']}, {m['C']}), got {tuple(u.shape)}")
    if m["classes"] and labels is None:
        raise ValueError("this model is class-conditional: pass labels")
    if block_b < 16 or block_b & (block_b - 1):
        raise ValueError(f"block_b must be a power of two >= 16, got {block_b}")
    dev = next(iter(packed.tensors.values())).device
    x = torch.zeros(b, m["C"], m["H"], m["W"], dtype=torch.float32, device=dev)
    if prefix is not None and start_row > 0:
        x[:, :, :start_row] = prefix[:, :, :start_row].to(x)
    lab = labels.to(dev, torch.int64) if labels is not None else torch.zeros(1, dtype=torch.int64, device=dev)
    probs = torch.zeros((b, m["C"], m["H"], m["W"], m["KP"]) if return_probs else (1,), dtype=torch.float32,
                        device=dev)
    grid = (tiles(b, block_b),)
    return x, u.to(dev, torch.float64).contiguous(), lab, probs, grid, start_row if prefix is not None else 0


def decode(
    packed: PackedDecoder,
    u: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    start_row: int = 0,
    block_b: int = 16,
    return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode images: u (B, H, W, C) float64 uniforms -> float32 levels (B, C, H, W).

    With ``prefix`` (B, C, H, W) levels and ``start_row``, rows above start_row are kept: the kernel runs
    over them with their known values (filling the caches) without sampling, then samples the rest.
    ``return_probs`` also returns the level probabilities each sub-pixel was drawn from, (B, C, H, W, levels):
    samples only move when rounding crosses a CDF edge, so tests compare these to the model's forward pass.
    """
    x, u, lab, probs, grid, start = launch_inputs(packed, u, labels, prefix, start_row, block_b, return_probs)
    m, t = packed.meta, packed.tensors
    scratch = torch.zeros(x.shape[0], max(m["L"], 1), m["IP"], m["R"], m["W"] + 2 * m["PAD"], dtype=torch.float32,
                          device=x.device)
    _pixelcnn_decode_kernel[grid](
        x, u, lab, scratch, probs,
        *(t[k] for k in _WEIGHTS),
        x.shape[0], m["H"], m["W"], m["K0"], m["K1"], start,
        HAS_LABELS=labels is not None, BLOCK_B=block_b, STORE_PROBS=return_probs,
        **{k: m[k] for k in _CONSTEXPRS}, num_warps=NUM_WARPS,
    )
    return (x, probs[..., : m["LEVELS"]]) if return_probs else x


# ---------------------------------------------------------------- reference


def decode_reference(
    forward: object, u: torch.Tensor, levels: int, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The same function in plain PyTorch: one full forward pass per sub-pixel, inverse-CDF sampling.

    ``forward(x (B, C, H, W) float levels, labels) -> log-probabilities (B, C, H, W, K)``.
    """
    b, h, w, c = u.shape
    x = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for k in range(c):
                lp = forward(x, labels)[:, k, i, j].double()  # type: ignore[operator]
                p = torch.exp(lp - lp.max(dim=-1, keepdim=True).values)
                cdf = p.cumsum(-1)
                x[:, k, i, j] = (cdf[:, :-1] <= u[:, i, j, k, None].double() * cdf[:, -1:]).sum(-1).double()
    return x.float()


__all__ = ["HEADS", "PackedDecoder", "decode", "decode_reference", "pack_pixelcnn", "tiles"]

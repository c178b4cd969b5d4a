"""Masked conv2d forward in Triton: an implicit GEMM over the kept taps only, with bias and the gated
tanh·sigmoid activation fused into the epilogue.

A causal mask zeroes about half of a kernel (a 3x3 mask B keeps 5 of 9 taps, a 7x7 mask A 24 of 49), so the
launcher packs the weight at the kept taps, (T, C_in, C_out), and the kernel loops over those T taps: for
each, a (BLOCK_M pixels x BLOCK_K input channels) tile of the shifted input times a (BLOCK_K x BLOCK_N)
tile of the packed weight, accumulated in float32. Per-channel colour masks at the centre tap are already
in the packed weight (it is ``weight * mask``).

Read top to bottom: the kernel, the launcher (checks, packing, allocation, launch), the PyTorch reference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without triton; launching a kernel then raises
    triton = None
    tl = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" for float32 operands, since on Ampere and later Triton's default
    rounds them to tf32 (10 mantissa bits), ~1e-3 relative error that the float32 contract does not allow.
    Half-precision operands are exact in either mode; "tf32" is then the default, spelled out."""
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _masked_conv2d_kernel(
        x_ptr,  # (B, C_in, H, W) input, contiguous
        w_ptr,  # (T, C_in, C_total) packed weight at the kept taps; C_total = C_out, or 2 * C_out if GATED
        b_ptr,  # (C_total,) bias, read only if HAS_BIAS
        dy_ptr,  # (T,) int32 row offset of each tap from the centre
        dx_ptr,  # (T,) int32 column offset of each tap from the centre
        o_ptr,  # (B, C_out, H, W) output
        B, C_in, H, W, C_out, T,  # sizes; T = kept taps
        C_total,  # columns of the packed weight
        HAS_BIAS: tl.constexpr,
        GATED: tl.constexpr,  # output tanh(a) * sigmoid(b) with a, b the two halves of C_total
        UPCAST_DOT: tl.constexpr,  # compute tl.dot in float32 (the interpreter's bf16 dot is wrong)
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 (the GPU default, tf32, is not)
        BLOCK_M: tl.constexpr,  # output pixels per program
        BLOCK_N: tl.constexpr,  # output channels per program
        BLOCK_K: tl.constexpr,  # input channels per inner step
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        hw = H * W
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat (b, h, w) output pixels
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < B * hw
        n_ok = rn < C_out
        bi = rm // hw
        h = (rm % hw) // W
        w = rm % W
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(T):
            dy = tl.load(dy_ptr + t)
            dx = tl.load(dx_ptr + t)
            hh = h + dy
            ww = w + dx
            pix_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            x_base = bi * (C_in * hw) + hh * W + ww  # (BLOCK_M,)
            for k0 in range(0, C_in, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < C_in
                a = tl.load(x_ptr + x_base[:, None] + kk[None, :] * hw, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                w_rows = w_ptr + t * (C_in * C_total) + kk[:, None] * C_total
                wa = tl.load(w_rows + rn[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST_DOT:
                    acc_a += tl.dot(a.to(tl.float32), wa.to(tl.float32), input_precision=PRECISION)
                else:
                    acc_a += tl.dot(a, wa, input_precision=PRECISION)
                if GATED:
                    wb = tl.load(w_rows + (rn + C_out)[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST_DOT:
                        acc_b += tl.dot(a.to(tl.float32), wb.to(tl.float32), input_precision=PRECISION)
                    else:
                        acc_b += tl.dot(a, wb, input_precision=PRECISION)
        if HAS_BIAS:
            acc_a += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_b += tl.load(b_ptr + rn + C_out, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            out = (2.0 * _sigmoid(2.0 * acc_a) - 1.0) * _sigmoid(acc_b)  # tanh(a) * sigmoid(b)
        else:
            out = acc_a
        o_off = bi[:, None] * (C_out * hw) + rn[None, :] * hw + (h * W + w)[:, None]
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


    # On a GPU the block sizes are chosen by timing these candidates once per problem shape (Triton's
    # autotuner caches the winner per key). The interpreter times nothing and uses DEFAULT_BLOCKS.
    TUNING_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in [
            (32, 32, 32, 4, 2), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3),
            (64, 64, 32, 8, 3), (128, 32, 32, 8, 3), (32, 64, 32, 4, 3),
        ]
    ]

    def _bench(kernel_call, quantiles):  # type: ignore[no-untyped-def]
        """Triton's timing on a GPU; under the interpreter (tests of the tuned path) one wall-clock run."""
        if _interpreting():
            t = time.perf_counter()
            kernel_call()
            return [time.perf_counter() - t] * len(quantiles)
        from triton.testing import do_bench

        return do_bench(kernel_call, quantiles=quantiles)

    _masked_conv2d_tuned = triton.autotune(
        configs=TUNING_CONFIGS, key=["B", "C_in", "H", "W", "C_out", "T", "GATED", "PRECISION"], do_bench=_bench
    )(_masked_conv2d_kernel)

DEFAULT_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}


# ---------------------------------------------------------------- launcher


@dataclass(frozen=True)
class PackedConv:
    """A masked convolution's weight at its kept taps, ready for the kernel."""

    weight: torch.Tensor  # (T, C_in, C_total)
    bias: torch.Tensor | None  # (C_total,)
    dy: torch.Tensor  # (T,) int32
    dx: torch.Tensor  # (T,) int32
    in_channels: int
    out_total: int
    kernel_size: tuple[int, int]

    @property
    def taps(self) -> int:
        return int(self.weight.shape[0])


def pack_masked_conv(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> PackedConv:
    """Gather ``weight * mask`` at the taps the mask keeps for any (out, in) pair."""
    if weight.dim() != 4 or weight.shape != mask.shape:
        raise ValueError(f"weight and mask must be (C_out, C_in, kh, kw) of one shape, got {tuple(weight.shape)} "
                         f"and {tuple(mask.shape)}")
    c_out, c_in, kh, kw = weight.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sizes must be odd, got {kh}x{kw}")
    kept = (mask != 0).flatten(0, 1).any(0).nonzero().tolist()  # [(ky, kx)] in raster order
    masked = weight * mask.to(weight.dtype)
    packed = torch.stack([masked[:, :, ky, kx].t() for ky, kx in kept]) if kept else masked.new_zeros(0, c_in, c_out)
    dev = weight.device
    return PackedConv(
        weight=packed.contiguous(),
        bias=None if bias is None else bias.detach().contiguous(),
        dy=torch.tensor([ky - kh // 2 for ky, _ in kept], dtype=torch.int32, device=dev),
        dx=torch.tensor([kx - kw // 2 for _, kx in kept], dtype=torch.int32, device=dev),
        in_channels=c_in,
        out_total=c_out,
        kernel_size=(kh, kw),
    )


def masked_conv2d_packed(
    x: torch.Tensor,
    packed: PackedConv,
    *,
    gated: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Run the kernel: x (B, C_in, H, W) -> (B, C_out, H, W), C_out = C_total (or C_total / 2 if gated).

    Block sizes: given, or (``autotune`` None) autotuned on a GPU and DEFAULT_BLOCKS under the interpreter.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (B, C_in, H, W), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.shape[1] != packed.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels, the weight expects {packed.in_channels}")
    if packed.weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {packed.weight.dtype}")
    if x.device != packed.weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.weight.device}")
    if gated and packed.out_total % 2:
        raise ValueError(f"a gated convolution needs an even number of output channels, got {packed.out_total}")
    given = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    for name, v in given.items():
        if v is not None and (v < 16 or v & (v - 1)):
            raise ValueError(f"{name.lower()} must be a power of two >= 16 (tl.dot's minimum), got {v}")
    if autotune and any(v is not None for v in given.values()):
        raise ValueError("autotune=True chooses the block sizes; do not pass them too")
    tuned = autotune if autotune is not None else not _interpreting() and all(v is None for v in given.values())
    blocks = {} if tuned else {k: v if v is not None else DEFAULT_BLOCKS[k] for k, v in given.items()}
    b, c_in, h, w = x.shape
    c_out = packed.out_total // 2 if gated else packed.out_total
    x = x.contiguous()
    out = torch.empty((b, c_out, h, w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(b * h * w, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"])

    bias = packed.bias if packed.bias is not None else packed.weight  # a dummy pointer when HAS_BIAS is off
    kernel = _masked_conv2d_tuned if tuned else _masked_conv2d_kernel
    kernel[grid](
        x, packed.weight, bias, packed.dy, packed.dx, out,
        b, c_in, h, w, c_out, packed.taps, packed.out_total,
        HAS_BIAS=packed.bias is not None, GATED=gated,
        UPCAST_DOT=_interpreting() and x.dtype == torch.bfloat16,
        PRECISION=dot_precision(x.dtype),
        **blocks,
    )
    return out


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    **blocks: int | None,
) -> torch.Tensor:
    """``masked_conv2d_reference`` computed by the Triton kernel (packing the weight on every call)."""
    return masked_conv2d_packed(x, pack_masked_conv(weight, mask, bias), gated=gated, **blocks)


# ---------------------------------------------------------------- reference


def masked_conv2d_reference(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None, *,
    gated: bool = False,
) -> torch.Tensor:
    """The same function in plain PyTorch: a 'same'-padded conv2d with ``weight * mask``, then the gate."""
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x, weight * mask.to(weight.dtype), bias, padding=(kh // 2, kw // 2))
    if not gated:
        return y
    a, b = y.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)

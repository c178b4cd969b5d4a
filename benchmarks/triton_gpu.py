"""GPU benchmark of the Triton kernels (needs CUDA; refuses to run without it: CPU timings of Triton mean
nothing).

1. Masked 3x3 mask-B convolution with the gated epilogue vs PyTorch eager (weight * mask, cuDNN conv, bias,
   tanh * sigmoid) and vs ``torch.compile`` of the same function: batch 16 and 64, 28x28 and 32x32, 64 and
   128 channels (gated: 2C pre-activation channels -> C outputs), in float16.
2. Whole-image sampling of the benchmark PixelCNN (28x28x1, 64 features, 8 blocks, Bernoulli, random
   weights) at batch 1, 16 and 256: naive decoding (one full forward per pixel, cuDNN, timed over the first
   rows and extrapolated), cached decoding in PyTorch (the incremental form), and the fused Triton kernel
   (one launch per batch tile); images/s, speedups and launches per image.

Medians of CUDA-event timings after warm-up. Writes JSON naming the device, driver, torch and triton versions.

    python benchmarks/triton_gpu.py --out benchmarks/results/triton-gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def cuda_time(fn: Any, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_conv(repeats: int) -> list[dict[str, Any]]:
    from genforge.models.layers import causal_mask
    from genforge.triton_kernels.masked_conv import masked_conv2d_packed, pack_masked_conv

    rows = []
    for batch in (16, 64):
        for size in (28, 32):
            for ch in (64, 128):
                dt = torch.float16
                x = torch.randn(batch, ch, size, size, device="cuda", dtype=dt)
                w = torch.randn(2 * ch, ch, 3, 3, device="cuda", dtype=dt) * 0.05
                b = torch.randn(2 * ch, device="cuda", dtype=dt)
                mask = causal_mask("B", 2 * ch, ch, (3, 3)).to("cuda", dt)

                def eager(x=x, w=w, b=b, mask=mask) -> torch.Tensor:
                    y = F.conv2d(x, w * mask, b, padding=1)
                    a, g = y.chunk(2, 1)
                    return torch.tanh(a) * torch.sigmoid(g)

                compiled = torch.compile(eager)
                packed = pack_masked_conv(w, mask, b)
                ref = eager()
                got = masked_conv2d_packed(x, packed, gated=True)
                err = float((got.float() - ref.float()).abs().max())
                t_eager = cuda_time(eager, repeats)
                t_comp = cuda_time(compiled, repeats)
                t_tri = cuda_time(lambda x=x, packed=packed: masked_conv2d_packed(x, packed, gated=True), repeats)
                rows.append({"batch": batch, "size": size, "channels": ch, "dtype": "float16",
                             "eager_ms": t_eager * 1e3, "compile_ms": t_comp * 1e3, "triton_ms": t_tri * 1e3,
                             "speedup_vs_eager": t_eager / t_tri, "speedup_vs_compile": t_comp / t_tri,
                             "max_abs_err": err})
                print(rows[-1], flush=True)
    return rows


def bench_sampling(repeats: int, naive_rows: int) -> list[dict[str, Any]]:
    from genforge.models import build_model
    from genforge.models.incremental import EagerStepper, incremental
    from genforge.runtime.decoding import cached_decode
    from genforge.runtime.randomness import uniforms
    from genforge.triton_kernels.pixelcnn_decode import decode, launches_per_batch, pack_pixelcnn

    torch.manual_seed(0)
    model = build_model("pixelcnn", {"channels": 1, "height": 28, "width": 28, "levels": 2,
                                     "likelihood": "bernoulli", "hidden": 64, "layers": 8,
                                     "output_hidden": 64}).cuda().eval()
    packed = pack_pixelcnn(model, "cuda")
    rows = []
    for batch in (1, 16, 256):
        u_np = uniforms(0, 0, batch, (28, 28, 1))
        u = torch.from_numpy(u_np).cuda()
        x = torch.zeros(batch, 1, 28, 28, device="cuda")
        with torch.inference_mode():
            t_forward = cuda_time(lambda x=x: model(x), repeats)
        naive_s = t_forward * 28 * 28  # every naive step is this forward pass (sampling cost not included)
        block_b = 16 if batch <= 16 else 64
        t_fused = cuda_time(lambda u=u, block_b=block_b: decode(packed, u, block_b=block_b), max(3, repeats // 4), 1)
        stepper = EagerStepper(incremental(model), torch.float32)
        with torch.inference_mode():
            t_cached_torch = cuda_time(lambda u_np=u_np, stepper=stepper: cached_decode(stepper, u_np, levels=2),
                                       2, 1)
        rows.append({"batch": batch, "naive_s_extrapolated": naive_s, "naive_rows_timed": "one forward x 784",
                     "cached_torch_s": t_cached_torch, "fused_triton_s": t_fused,
                     "fused_images_per_s": batch / t_fused, "speedup_fused_vs_naive": naive_s / t_fused,
                     "speedup_cached_torch_vs_naive": naive_s / t_cached_torch,
                     "launches_per_image_batch": launches_per_batch(batch, block_b)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--naive-rows", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/triton-gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_gpu.py needs a CUDA device: Triton timings on the CPU mean nothing")
    import triton

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "triton kernels",
        "command": f"python benchmarks/triton_gpu.py --repeats {args.repeats} --out {args.out}",
        "device": torch.cuda.get_device_name(), "driver": driver,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "masked_conv_gated": bench_conv(args.repeats),
        "sampling": bench_sampling(args.repeats, args.naive_rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

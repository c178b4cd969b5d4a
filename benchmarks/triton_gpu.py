"""GPU benchmark of the Triton kernels, every figure from one run on one device.

1. Masked 3x3 mask-B convolution with the gated epilogue vs PyTorch eager (weight * mask, cuDNN conv, bias,
   tanh * sigmoid) and vs ``torch.compile`` of the same function: batch 16 and 64, 28x28 and 32x32, 64 and
   128 channels (gated: 2C pre-activation channels -> C outputs), float16. The Triton kernel's block sizes
   are autotuned during the warm-up.
2. Whole-image sampling of the benchmark PixelCNN of the cached-decoding issue (28x28x1, 64 features,
   8 blocks, Bernoulli, random weights) at batch 1, 16 and 256:
   - naive: one full forward pass per pixel, inverse-CDF sampling on the device, no host round trips
     (timed over ``--naive-pixels`` pixels and extrapolated when fewer than the whole image, said so);
   - cached-torch: the runtime's cached loop over the model's incremental form in PyTorch;
   - fused: the Triton kernel, one launch per batch (one program per tile of 16 images), whole images.
   The same for a gated PixelCNN of the same width (64 features, a first layer and 8 more), in ``sampling_gated``.
   Images/s, speedups, the fraction of sub-pixels where fused and naive samples agree (float32 vs cuDNN's
   defaults: they may differ where a uniform sits within rounding of a CDF edge), and kernel launches per
   image counted by the profiler.

Medians of CUDA-event timings after warm-up. Writes JSON naming the device, driver, torch and triton versions.

    python benchmarks/triton_gpu.py --out benchmarks/results/triton-gpu

``--smoke`` runs every code path on tiny shapes on the CPU under TRITON_INTERPRET=1 (the test suite does);
its timings mean nothing and its JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FULL = {"conv": {"batch": (16, 64), "size": (28, 32), "channels": (64, 128), "dtype": torch.float16},
        "model": {"size": 28, "hidden": 64, "layers": 8}, "sample_batch": (1, 16, 256)}
SMOKE = {"conv": {"batch": (2,), "size": (5,), "channels": (16,), "dtype": torch.float16},
         "model": {"size": 3, "hidden": 8, "layers": 1}, "sample_batch": (1, 17)}


def make_timer(device: str, repeats: int) -> Callable[..., float]:
    def timer(fn: Callable[[], Any], repeats: int = repeats, warmup: int = 3) -> float:
        """Median seconds per call (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    return timer


def count_launches(device: str, fn: Callable[[], Any]) -> int | None:
    """GPU kernels one call of fn launches, counted by the profiler (None on the CPU)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    except Exception as e:  # a profiler problem must not cost the timings of a scarce GPU session
        print(f"launch count unavailable: {e}", flush=True)
        return None


def bench_conv(device: str, sizes: dict[str, Any], timer: Callable[..., float], smoke: bool) -> list[dict[str, Any]]:
    from genforge.models.layers import causal_mask
    from genforge.triton_kernels.masked_conv import masked_conv2d_packed, pack_masked_conv

    rows = []
    dt = sizes["dtype"]
    for batch in sizes["batch"]:
        for size in sizes["size"]:
            for ch in sizes["channels"]:
                g = torch.Generator().manual_seed(batch * 1000 + size * 10 + ch)
                x = torch.randn(batch, ch, size, size, generator=g).to(device, dt)
                w = (torch.randn(2 * ch, ch, 3, 3, generator=g) * 0.05).to(device, dt)
                b = torch.randn(2 * ch, generator=g).to(device, dt)
                mask = causal_mask("B", 2 * ch, ch, (3, 3)).to(device, dt)

                def eager(x=x, w=w, b=b, mask=mask) -> torch.Tensor:
                    y = F.conv2d(x, w * mask, b, padding=1)
                    a, g = y.chunk(2, 1)
                    return torch.tanh(a) * torch.sigmoid(g)

                # On the CPU the smoke run only checks the code path, without inductor's C++ build.
                compiled = torch.compile(eager, backend="eager" if smoke else "inductor")
                packed = pack_masked_conv(w, mask, b)

                def triton_fn(x=x, packed=packed) -> torch.Tensor:
                    return masked_conv2d_packed(x, packed, gated=True)

                t_tri = timer(triton_fn)  # first: its warm-up runs the autotuner
                ref = eager(x.double(), w.double(), b.double(), mask.double())
                err = float((triton_fn().double() - ref).abs().max())
                err_eager = float((eager().double() - ref).abs().max())
                t_eager = timer(eager)
                t_comp = timer(compiled)
                rows.append({"batch": batch, "size": size, "channels": ch, "dtype": str(dt).removeprefix("torch."),
                             "eager_ms": t_eager * 1e3, "compile_ms": t_comp * 1e3, "triton_ms": t_tri * 1e3,
                             "speedup_vs_eager": t_eager / t_tri, "speedup_vs_compile": t_comp / t_tri,
                             "max_abs_err_vs_float64": err, "eager_max_abs_err_vs_float64": err_eager,
                             "launches": {"eager": count_launches(device, eager),
                                          "triton": count_launches(device, triton_fn)}})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def naive_sample(model: torch.nn.Module, u: torch.Tensor, pixels: int) -> torch.Tensor:
    """The plain reference on the device: one full forward per pixel (of the first ``pixels``), the same
    inverse-CDF rule as runtime/decoding.py, no host round trips."""
    b, h, w, c = u.shape
    x = torch.zeros(b, c, h, w, device=u.device)
    with torch.inference_mode():
        for p in range(pixels):
            i, j = divmod(p, w)
            for k in range(c):
                lp = model(x)[:, k, i, j].double()
                cdf = torch.exp(lp - lp.max(-1, keepdim=True).values).cumsum(-1)
                x[:, k, i, j] = (cdf[:, :-1] <= u[:, i, j, k, None] * cdf[:, -1:]).sum(-1).float()
    return x


def bench_sampling(device: str, sizes: dict[str, Any], timer: Callable[..., float], naive_pixels: int | None,
                   name: str = "pixelcnn") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from genforge.models import build_model
    from genforge.models.incremental import EagerStepper
    from genforge.runtime.decoding import cached_decode
    from genforge.runtime.randomness import uniforms
    from genforge.triton_kernels.gated_decode import decode_gated, pack_gated_pixelcnn
    from genforge.triton_kernels.pixelcnn_decode import decode, pack_pixelcnn, tiles

    m = sizes["model"]
    s = m["size"]
    torch.manual_seed(0)
    config = {"channels": 1, "height": s, "width": s, "levels": 2, "likelihood": "bernoulli", "hidden": m["hidden"],
              "layers": m["layers"], "output_hidden": m["hidden"]}
    model = build_model(name, config).to(device).eval()
    gated = name == "gated-pixelcnn"
    packed = (pack_gated_pixelcnn if gated else pack_pixelcnn)(model, device)
    decode_fn = decode_gated if gated else decode
    total = s * s
    pixels = total if naive_pixels is None else min(naive_pixels, total)
    rows = []
    for batch in sizes["sample_batch"]:
        u_np = uniforms(0, 0, batch, (s, s, 1))
        u = torch.from_numpy(u_np).to(device)

        def fused(u=u) -> torch.Tensor:
            return decode_fn(packed, u)

        t_fused = timer(fused, warmup=1)
        naive: dict[str, torch.Tensor] = {}  # the timed run's images, reused for the agreement check
        t_naive = timer(lambda u=u, naive=naive: naive.update(x=naive_sample(model, u, pixels)), repeats=1, warmup=0)
        t_naive *= total / pixels
        stepper = EagerStepper(model.cached_form(), torch.float32)
        with torch.inference_mode():
            t_cached = timer(lambda u_np=u_np, stepper=stepper: cached_decode(stepper, u_np, levels=2),
                             repeats=1, warmup=1)
        rows_done = pixels // s
        got = fused()[:, :, :rows_done].cpu()
        ref = naive["x"][:, :, :rows_done].cpu()
        with torch.inference_mode():
            zeros = torch.zeros(batch, 1, s, s, device=device)
            step_launches = count_launches(device, lambda zeros=zeros: model(zeros))
        rows.append({
            "batch": batch, "naive_s": t_naive, "naive_pixels_timed": pixels, "naive_extrapolated": pixels < total,
            "cached_torch_s": t_cached, "fused_triton_s": t_fused,
            "images_per_s": {"naive": batch / t_naive, "cached_torch": batch / t_cached, "fused": batch / t_fused},
            "speedup_fused_vs_naive": t_naive / t_fused, "speedup_cached_torch_vs_naive": t_naive / t_cached,
            "samples_agree_fused_vs_naive": float((got == ref).double().mean()),
            "agreement_checked_rows": rows_done,
            "launches_per_batch": {"fused": count_launches(device, fused), "fused_expected": 1,
                                   "fused_programs": tiles(batch),
                                   "naive": None if step_launches is None else step_launches * total},
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"model": name, **config}, rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--naive-pixels", type=int, default=None, help="time naive decoding over this many pixels "
                    "and extrapolate (default: the whole image)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default="benchmarks/results/triton-gpu")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs on the CPU under TRITON_INTERPRET=1; set it")
        device, sizes, repeats = "cpu", SMOKE, 1
    else:
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("benchmarks/triton_gpu.py needs a CUDA device without TRITON_INTERPRET: Triton timings "
                             "on the CPU mean nothing (use --smoke to check the code paths)")
        device, sizes, repeats = "cuda", FULL, args.repeats
    import triton

    timer = make_timer(device, repeats)
    if device == "cuda":
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
        name = torch.cuda.get_device_name()
    else:
        driver, name = None, "cpu (TRITON_INTERPRET=1 smoke run: timings mean nothing)"
    command = f"python benchmarks/triton_gpu.py --repeats {args.repeats} --out {args.out}"
    if args.naive_pixels is not None:
        command += f" --naive-pixels {args.naive_pixels}"
    result: dict[str, Any] = {
        "benchmark": "triton kernels", "smoke": args.smoke,
        "command": command + (" --smoke" if args.smoke else ""),
        "device": name, "driver": driver,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "masked_conv_gated": bench_conv(device, sizes["conv"], timer, args.smoke),
    }
    result["sampling_model"], result["sampling"] = bench_sampling(device, sizes, timer, args.naive_pixels)
    result["sampling_gated_model"], result["sampling_gated"] = bench_sampling(device, sizes, timer, args.naive_pixels,
                                                                              "gated-pixelcnn")
    conv, samp = result["masked_conv_gated"], result["sampling"]
    result["goals"] = {
        "masked_conv_min_speedup_vs_eager": min(r["speedup_vs_eager"] for r in conv),
        "cached_vs_naive_batch1": next((r["speedup_fused_vs_naive"] for r in samp if r["batch"] == 1), None),
        "cached_vs_naive_batch256": next((r["speedup_fused_vs_naive"] for r in samp if r["batch"] == 256), None),
        "targets": {"masked_conv": 1.5, "batch1": 100, "batch256": 200},
    }
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main()

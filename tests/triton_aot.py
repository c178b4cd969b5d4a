"""Compile every Triton kernel variant the runtime launches for a GPU target, on a machine without one.

The interpreter runs kernels as numpy and accepts programs the compiler rejects (a loop variable that
changes shape, a constexpr used as a value, ...); Triton compiles to PTX and cubin without a device, with
the ptxas its wheel ships. Prints one JSON line per variant: registers and spill bytes from ``ptxas -v``.

    python tests/triton_aot.py [--arch 90]

Must run without TRITON_INTERPRET (tests/test_triton.py runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def signature(fn: Any, constexprs: dict[str, Any], types: dict[str, str]) -> dict[str, str]:
    """Argument types by name: constexprs, the given pointer types, other ``*_ptr`` float32, integers i32."""
    return {n: "constexpr" if n in constexprs else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
            for n in fn.arg_names}


def pointer_types(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``name_ptr`` types from the packed tensors the launcher passes, so the signature cannot drift."""
    names = {torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.float64: "*fp64"}
    return {f"{k}_ptr": names[v.dtype] for k, v in tensors.items()}


def ptxas_stats(ptx: str, arch: int) -> dict[str, int]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ptx)
        for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton writes
            r = subprocess.run([str(bin_dir / name), "-v", f"--gpu-name=sm_{arch}a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                return {"registers": int(regs.group(1)) if regs else -1,
                        "spill_bytes": int(spill.group(1)) if spill else 0}
    return {}


def variants() -> list[tuple[str, Any, dict[str, Any], dict[str, str], dict[str, int]]]:
    from genforge.models import build_model
    from genforge.triton_kernels import masked_conv as mc
    from genforge.triton_kernels import pixelcnn_decode as pd

    out = []
    taps = {"dy_ptr": "*i32", "dx_ptr": "*i32"}
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        # the interpreter's blocks for every dtype; every autotuning candidate for float32 (the runtime's
        # forward) and float16 (the benchmark), gated, with the candidate's own warps and stages
        configs = [(mc.DEFAULT_BLOCKS, 4, 3, False)]
        if dtype != torch.bfloat16:
            configs += [(dict(c.kwargs), c.num_warps, c.num_stages, True) for c in mc.TUNING_CONFIGS]
        for blocks, warps, stages, gated in configs:
            consts = {"HAS_BIAS": True, "GATED": gated, "UPCAST_DOT": False, "PRECISION": mc.dot_precision(dtype),
                      **blocks}
            types = {**taps, "x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "o_ptr": f"*{ty}"}
            name = f"masked_conv {ty} gated={gated} blocks={tuple(blocks.values())} warps={warps} stages={stages}"
            out.append((name, mc._masked_conv2d_kernel, consts, types, {"num_warps": warps, "num_stages": stages}))
    from genforge.triton_kernels import gated_decode as gd

    decoders = [  # (model, packer, kernel module, kernel, (channels, likelihood, levels, classes, probs) cases)
        ("pixelcnn", pd.pack_pixelcnn, pd, pd._pixelcnn_decode_kernel,
         [(1, "bernoulli", 2, 0, False), (3, "categorical", 256, 10, True), (3, "logistic-mixture", 256, 0, False)]),
        ("gated-pixelcnn", gd.pack_gated_pixelcnn, gd, gd._gated_decode_kernel,
         [(1, "bernoulli", 2, 0, False), (3, "categorical", 256, 10, True)]),
    ]
    for model_name, pack, module, kernel, cases in decoders:
        for channels, likelihood, levels, classes, probs in cases:
            # 28x28 models of the benchmark's width and depth; hidden a multiple of 3 for colour
            model = build_model(model_name, {"channels": channels, "height": 28, "width": 28, "levels": levels,
                                             "likelihood": likelihood, "hidden": 64 if channels == 1 else 63,
                                             "layers": 8 if model_name == "pixelcnn" else 7, "output_hidden": 64,
                                             "num_classes": classes})
            packed = pack(model)
            consts = {k: packed.meta[k] for k in module._CONSTEXPRS}
            consts.update(HAS_LABELS=bool(classes), BLOCK_B=16, STORE_PROBS=probs)
            types = {**pointer_types(packed.tensors), "u_ptr": "*fp64", "lab_ptr": "*i64"}
            name = f"{kernel.__name__.strip('_').removesuffix('_kernel')} {likelihood} C={channels} " \
                   f"labels={bool(classes)} probs={probs}"
            out.append((name, kernel, consts, types, {"num_warps": module.NUM_WARPS}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for name, fn, consts, types, options in variants():
        try:
            k = triton.compile(ASTSource(fn, signature(fn, consts, types), consts),
                               target=GPUTarget("cuda", args.arch, 32), options=options)
            print(json.dumps({"kernel": name, "ok": True, **ptxas_stats(k.asm["ptx"], args.arch)}), flush=True)
        except Exception as e:  # report every variant, then fail
            failed += 1
            print(json.dumps({"kernel": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

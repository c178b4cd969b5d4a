"""Triton kernels against their PyTorch references, and the triton runtime backend against TorchScript.

On the CPU (every CI run) the kernels run under TRITON_INTERPRET=1 (set in conftest.py) on tiny shapes that
are not multiples of the block sizes. A GPU session runs the same tests compiled, on CUDA:
``GENFORGE_TEST_DEVICE=cuda python -m pytest tests/test_triton.py``.

Tolerances (max |kernel - reference| on outputs of magnitude ~1-10): float32 1e-4; float16 rtol 1e-2 /
atol 1e-2; bfloat16 rtol 2e-2 / atol 6e-2 (8 mantissa bits). Under the interpreter the bf16 operands of
tl.dot are upcast to float32 (Triton 3.9's interpreter mis-evaluates bf16 dots), so these tests cover the
bf16 loads, stores and epilogue, not the bf16 MMA itself, which only the GPU run exercises.

float32 means float32: on a GPU, tl.dot rounds float32 operands to tf32 unless told input_precision="ieee".
The interpreter computes every dot exactly, so the ``gpu_like_tf32`` fixture makes it round as the GPU
would whenever a kernel asks for tf32; a kernel that forgot "ieee" fails these tests on the CPU too.

Sampling: the fused kernel computes in float32 like the other backends, and a sample can differ only when
its uniform lies within float32 rounding (~1e-6 relative) of a CDF edge. The equality tests use fixed
seeds; the chance of such a flip on these sizes is below 1e-4 per test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from genforge.models import build_model
from genforge.models.layers import causal_mask
from genforge.runtime.randomness import uniforms
from genforge.triton_kernels.masked_conv import masked_conv2d, masked_conv2d_reference
from genforge.triton_kernels.pixelcnn_decode import decode, decode_reference, pack_pixelcnn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if os.environ.get("GENFORGE_TEST_DEVICE") == "cuda" else "cpu"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not (DEVICE == "cuda" and torch.cuda.is_available()),
    reason="needs TRITON_INTERPRET=1 (conftest sets it) or GENFORGE_TEST_DEVICE=cuda on a CUDA machine",
)


def _round_to_tf32(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest value with tf32's 10 mantissa bits (round half away from zero on the bits)."""
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture(autouse=True)
def gpu_like_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    if not INTERPRET:
        return
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32:
            a = interpreter.TensorHandle(_round_to_tf32(a.data), a.dtype)
            b = interpreter.TensorHandle(_round_to_tf32(b.data), b.dtype)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 6e-2)}
CONVS = [  # (C_in, C_out, kernel, mask, colour groups, shape)
    (3, 6, 7, "A", 3, "full"),
    (5, 10, 3, "B", 1, "full"),
    (20, 34, 3, "B", 1, "full"),
    (4, 6, (1, 5), "B", 3, "horizontal"),
    (4, 8, 5, "A", 1, "vertical"),
]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{c[3]}-{c[5]}")
def test_masked_conv_matches_reference(dtype: torch.dtype, gated: bool, conv: tuple) -> None:
    c_in, c_out, k, mask_type, groups, shape = conv
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the seed is in the message
    g = torch.Generator().manual_seed(seed)
    ks = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c_in, 5, 7, generator=g).to(dtype)
    w = (torch.randn(c_out, c_in, *ks, generator=g) * 0.3).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype)
    mask = causal_mask(mask_type, c_out, c_in, ks, groups=groups, shape=shape)
    out = masked_conv2d(x.to(DEVICE), w.to(DEVICE), mask.to(DEVICE), b.to(DEVICE), gated=gated,
                        block_m=16, block_n=16, block_k=16).cpu()
    ref = masked_conv2d_reference(x.double(), w.double(), mask.double(), b.double(), gated=gated).float()
    assert out.dtype == dtype and out.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol, msg=lambda m: f"seed {seed}: {m}")


def _tuning_configs() -> list[dict[str, int]]:
    from genforge.triton_kernels import masked_conv

    return [dict(c.kwargs) for c in masked_conv.TUNING_CONFIGS]


@pytest.mark.parametrize("blocks", _tuning_configs(), ids=lambda b: "-".join(map(str, b.values())))
def test_every_tuning_config_computes_the_same_function(blocks: dict[str, int], fresh_seed: int) -> None:
    """The autotuner may pick any of these on a GPU; each must be correct (here with ragged sizes)."""
    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(3, 20, 6, 5, generator=g)
    w = torch.randn(68, 20, 3, 3, generator=g) * 0.3
    b = torch.randn(68, generator=g)
    mask = causal_mask("B", 68, 20, (3, 3))
    out = masked_conv2d(x.to(DEVICE), w.to(DEVICE), mask.to(DEVICE), b.to(DEVICE), gated=True,
                        **{k.lower(): v for k, v in blocks.items()}).cpu()
    ref = masked_conv2d_reference(x.double(), w.double(), mask.double(), b.double(), gated=True).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_autotuned_launch_picks_a_config_and_computes_the_same_function(fresh_seed: int) -> None:
    """The path a GPU takes by default (Triton's autotuner over TUNING_CONFIGS), here timed by wall clock."""
    from genforge.triton_kernels import masked_conv as mc

    g = torch.Generator().manual_seed(fresh_seed)
    x = torch.randn(2, 20, 5, 6, generator=g)
    w = torch.randn(68, 20, 3, 3, generator=g) * 0.3
    b = torch.randn(68, generator=g)
    mask = causal_mask("B", 68, 20, (3, 3))
    packed = mc.pack_masked_conv(w.to(DEVICE), mask.to(DEVICE), b.to(DEVICE))
    out = mc.masked_conv2d_packed(x.to(DEVICE), packed, gated=True, autotune=True).cpu()
    assert mc._masked_conv2d_tuned.best_config in mc.TUNING_CONFIGS
    ref = masked_conv2d_reference(x.double(), w.double(), mask.double(), b.double(), gated=True).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="autotune=True chooses the block sizes"):
        mc.masked_conv2d_packed(x.to(DEVICE), packed, autotune=True, block_m=16)


def test_every_dot_states_its_precision() -> None:
    """The fused decode's samples are too coarse to show tf32 rounding on tiny shapes, so the policy is also
    checked in the source: every tl.dot in triton_kernels/ names its input_precision."""
    import ast
    from pathlib import Path

    import genforge.triton_kernels as pkg

    dots = 0
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot":
                dots += 1
                assert "input_precision" in {k.arg for k in node.keywords}, f"{path.name}:{node.lineno}"
    assert dots >= 5


def test_masked_conv_visits_only_kept_taps() -> None:
    from genforge.triton_kernels.masked_conv import pack_masked_conv

    assert pack_masked_conv(torch.ones(4, 4, 3, 3), causal_mask("B", 4, 4, (3, 3))).taps == 5
    assert pack_masked_conv(torch.ones(6, 3, 7, 7), causal_mask("A", 6, 3, (7, 7), groups=3)).taps == 25
    assert pack_masked_conv(torch.ones(4, 1, 7, 7), causal_mask("A", 4, 1, (7, 7))).taps == 24


def test_masked_conv_checks_its_arguments() -> None:
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(4, 3, 3, 3)
    m = causal_mask("B", 4, 3, (3, 3))
    with pytest.raises(ValueError, match="x has 2 channels"):
        masked_conv2d(torch.randn(1, 2, 4, 4), w, m)
    with pytest.raises(ValueError, match=r"is torch\.float16 but the weight is torch\.float32"):
        masked_conv2d(x.half(), w, m)
    with pytest.raises(ValueError, match="unsupported dtype"):
        masked_conv2d(x.double(), w.double(), m)
    with pytest.raises(ValueError, match="even number of output channels"):
        masked_conv2d(x, torch.randn(3, 3, 3, 3), causal_mask("B", 3, 3, (3, 3)), gated=True)
    with pytest.raises(ValueError, match="power of two >= 16"):
        masked_conv2d(x, w, m, block_m=8)


HEADS = [(1, "bernoulli", 2, 0), (3, "categorical", 5, 3), (1, "logistic-mixture", 9, 0), (3, "logistic-mixture", 6, 0)]


@pytest.mark.parametrize("channels,likelihood,levels,classes", HEADS)
def test_fused_decode_matches_reference(channels: int, likelihood: str, levels: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model("pixelcnn", {"channels": channels, "height": 3, "width": 4, "levels": levels,
                                     "likelihood": likelihood, "hidden": 6, "layers": 2, "output_hidden": 5,
                                     "n_mix": 2, "num_classes": classes}).eval()
    u = torch.from_numpy(uniforms(1, 0, 3, (3, 4, channels)))
    labels = torch.tensor([0, 2, 1]) if classes else None
    assert_decodes_like_reference(model, decode, pack_pixelcnn, u, levels, labels)


def assert_decodes_like_reference(model: torch.nn.Module, decode_fn: Callable[..., Any], pack_fn: Callable[..., Any],
                                  u: torch.Tensor, levels: int, labels: torch.Tensor | None = None) -> None:
    """The fused kernel's images == the plain reference's, exactly, and its distributions match too."""
    out, probs = decode_fn(pack_fn(model, DEVICE), u, labels=labels, return_probs=True)
    with torch.no_grad():
        ref = decode_reference(lambda x, lab: model(x.float(), lab), u, levels, labels)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
    assert_probs_match(model, out, probs, labels)


def assert_probs_match(model: torch.nn.Module, out: torch.Tensor, probs: torch.Tensor,
                       labels: torch.Tensor | None = None) -> None:
    """The distributions the kernel sampled from == the model's conditionals given the finished image (one
    forward pass, by causality), to 2e-6: samples alone move only when rounding crosses a CDF edge, so a
    small error in a cache would pass a sample-equality test unseen."""
    with torch.no_grad():
        ref = model(out.cpu().float(), labels).double().exp()
    torch.testing.assert_close(probs.cpu().double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("first_kernel,kernel,layers", [(3, 5, 2), (5, 3, 0)])
def test_fused_decode_other_kernel_sizes(first_kernel: int, kernel: int, layers: int) -> None:
    """5x5 blocks keep a 3-row ring (12 taps x channels in one product); zero blocks skip the ring."""
    torch.manual_seed(2)
    model = build_model("pixelcnn", {"channels": 3, "height": 4, "width": 5, "levels": 4, "likelihood": "categorical",
                                     "hidden": 6, "layers": layers, "output_hidden": 6, "first_kernel": first_kernel,
                                     "kernel": kernel}).eval()
    u = torch.from_numpy(uniforms(5, 0, 2, (4, 5, 3)))
    assert_decodes_like_reference(model, decode, pack_pixelcnn, u, 4)


def test_fused_decode_completion_keeps_rows_and_fills_caches() -> None:
    torch.manual_seed(1)
    model = build_model("pixelcnn", {"channels": 1, "height": 4, "width": 3, "levels": 4, "hidden": 6,
                                     "layers": 1, "output_hidden": 5}).eval()
    u = torch.from_numpy(uniforms(2, 0, 2, (4, 3, 1)))
    prefix = torch.randint(0, 4, (2, 1, 4, 3)).float()
    out, probs = decode(pack_pixelcnn(model, DEVICE), u, prefix=prefix, start_row=2, return_probs=True)
    out = out.cpu()
    torch.testing.assert_close(out[:, :, :2], prefix[:, :, :2])
    assert_probs_match(model, out, probs)  # kept rows too: the caches were filled from the prefix

    def forward(x, lab):  # the reference with the same kept rows
        x = x.clone()
        x[:, :, :2] = prefix[:, :, :2].double()
        return model(x.float(), lab)

    with torch.no_grad():
        ref = decode_reference(forward, u, 4)
    torch.testing.assert_close(out[:, :, 2:], ref[:, :, 2:], rtol=0, atol=0)


GATED = [  # (channels, likelihood, levels, classes, extra layers, first kernel, kernel)
    (1, "bernoulli", 2, 0, 2, 7, 3),
    (3, "categorical", 5, 3, 1, 7, 3),
    (1, "logistic-mixture", 9, 0, 0, 3, 3),
    (3, "logistic-mixture", 6, 2, 2, 5, 5),
]


@pytest.mark.parametrize("channels,likelihood,levels,classes,layers,first_kernel,kernel", GATED)
def test_fused_gated_decode_matches_reference(channels: int, likelihood: str, levels: int, classes: int,
                                              layers: int, first_kernel: int, kernel: int) -> None:
    from genforge.triton_kernels.gated_decode import decode_gated, pack_gated_pixelcnn

    torch.manual_seed(3)
    model = build_model("gated-pixelcnn", {"channels": channels, "height": 4, "width": 5, "levels": levels,
                                           "likelihood": likelihood, "hidden": 6, "layers": layers,
                                           "output_hidden": 5, "n_mix": 2, "num_classes": classes,
                                           "first_kernel": first_kernel, "kernel": kernel}).eval()
    u = torch.from_numpy(uniforms(4, 0, 3, (4, 5, channels)))
    labels = torch.tensor([0, 1, 1]) if classes else None
    assert_decodes_like_reference(model, decode_gated, pack_gated_pixelcnn, u, levels, labels)


def test_fused_gated_decode_completion() -> None:
    from genforge.triton_kernels.gated_decode import decode_gated, pack_gated_pixelcnn

    torch.manual_seed(4)
    model = build_model("gated-pixelcnn", {"channels": 1, "height": 5, "width": 3, "levels": 4, "hidden": 6,
                                           "layers": 1, "output_hidden": 5}).eval()
    u = torch.from_numpy(uniforms(6, 0, 2, (5, 3, 1)))
    prefix = torch.randint(0, 4, (2, 1, 5, 3)).float()
    out, probs = decode_gated(pack_gated_pixelcnn(model, DEVICE), u, prefix=prefix, start_row=3, return_probs=True)
    out = out.cpu()
    torch.testing.assert_close(out[:, :, :3], prefix[:, :, :3])
    assert_probs_match(model, out, probs)


@pytest.mark.parametrize("name", ["pixelcnn", "gated-pixelcnn"])
def test_one_launch_decodes_a_batch_one_program_per_tile(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted at the kernel: a batch of 17 is one launch of 2 programs (tiles of 16), and every image of
    the second, partial tile is decoded (none left at zero where the reference samples a nonzero level)."""
    from genforge.triton_kernels import gated_decode, pixelcnn_decode
    from genforge.triton_kernels.decoders import FUSED_DECODERS

    module, attr = {"pixelcnn": (pixelcnn_decode, "_pixelcnn_decode_kernel"),
                    "gated-pixelcnn": (gated_decode, "_gated_decode_kernel")}[name]
    kernel, grids = getattr(module, attr), []

    class Counting:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return kernel[grid]

    monkeypatch.setattr(module, attr, Counting())
    torch.manual_seed(5)
    model = build_model(name, {"channels": 1, "height": 3, "width": 3, "levels": 4, "hidden": 4, "layers": 1,
                               "output_hidden": 4}).eval()
    d = FUSED_DECODERS[name]
    u = torch.from_numpy(uniforms(9, 0, 17, (3, 3, 1)))
    out = d.decode(d.pack(model, DEVICE), u).cpu()
    assert grids == [(2,)]
    ref = decode_reference(model, u, 4)
    torch.testing.assert_close(out[16:], ref[16:].to(out))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from genforge.export import export_run
    from genforge.train import DataSpec, TrainConfig, train_run

    root = tmp_path_factory.mktemp("triton")
    out = {}
    for name, model, likelihood in (("pixelcnn", "pixelcnn", "categorical"),
                                    ("gated-pixelcnn", "gated-pixelcnn", "categorical"),
                                    ("gated-gaussian", "gated-pixelcnn", "gaussian")):
        run = train_run(model=model, data=DataSpec(levels=4), train=TrainConfig(steps=8, n_samples=0, eval_limit=8),
                        model_overrides={"hidden": 6, "layers": 1, "output_hidden": 6, "likelihood": likelihood},
                        out=root / name, progress=False).run_dir
        out[name] = export_run(run, root / f"{name}-bundle", formats=("torchscript",))
    return out


def test_a_head_without_a_fused_kernel_decodes_with_the_cached_form(bundles) -> None:
    """The gaussian head has no fused kernel: the backend's table says so and it decodes with the cached
    form on the same device (before the table: a KeyError from the kernel's head map)."""
    from genforge.runtime import load
    from genforge.triton_kernels.decoders import FUSED_DECODERS, fused_decoder

    assert fused_decoder("gated-pixelcnn", "gaussian") is None
    assert "gaussian" not in FUSED_DECODERS["pixelcnn"].likelihoods
    triton_s = load(bundles["gated-gaussian"], backend="triton", device=DEVICE)
    assert not triton_s.backend.fused
    ts = load(bundles["gated-gaussian"], backend="torchscript", device="cpu")
    np.testing.assert_array_equal(triton_s.sample(2, seed=4), ts.sample(2, seed=4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pixelcnn", "gated-pixelcnn"])
def test_triton_backend_samples_like_torchscript(bundles, name: str, fresh_seed: int) -> None:
    from genforge.runtime import load

    triton_s = load(bundles[name], backend="triton", device=DEVICE)
    ts = load(bundles[name], backend="torchscript", device="cpu")
    assert triton_s.backend.fused  # both decode whole images in one fused kernel launch per batch tile
    np.testing.assert_array_equal(triton_s.sample(2, seed=4), ts.sample(2, seed=4))
    # Parallel decoding iterates the forward pass with the Triton masked convolution (no window path here).
    np.testing.assert_array_equal(triton_s.sample(2, seed=4, decoder="parallel"), ts.sample(2, seed=4))
    assert triton_s.last_stats["method"] == "forward" and triton_s.last_stats["passes"][0] >= 1
    images = np.random.default_rng(fresh_seed).integers(0, 4, (2, 8, 8, 1)).astype(np.uint8)
    np.testing.assert_allclose(triton_s.log_prob(images), ts.log_prob(images), rtol=1e-5)
    done = triton_s.complete(images, rows=5, seed=1)
    np.testing.assert_array_equal(done[:, :5], images[:, :5])
    np.testing.assert_array_equal(done, ts.complete(images, rows=5, seed=1))


def test_triton_backend_refuses_the_cpu_without_the_interpreter(bundles, monkeypatch: pytest.MonkeyPatch) -> None:
    from genforge.runtime import RuntimeBackendError, load

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeBackendError, match="runs on CUDA"):
        load(bundles["pixelcnn"], backend="triton", device="cpu")


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="the smoke run is the CPU rehearsal of the GPU benchmark")
def test_gpu_benchmark_smoke_run(tmp_path) -> None:
    """benchmarks/triton_gpu.py end to end on tiny shapes, so a GPU session only has to run it: every code
    path runs, the kernels agree with the references, and the JSON says the timings mean nothing."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "triton_gpu.py"
    out = tmp_path / "smoke"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["smoke"] is True and "timings mean nothing" in result["device"]
    (conv,) = result["masked_conv_gated"]
    assert conv["max_abs_err_vs_float64"] < 1e-2 and conv["triton_ms"] > 0
    assert [r["batch"] for r in result["sampling"]] == [1, 17] == [r["batch"] for r in result["sampling_gated"]]
    for row in result["sampling"] + result["sampling_gated"]:
        assert row["samples_agree_fused_vs_naive"] == 1.0
        assert row["launches_per_batch"]["fused_expected"] == 1
        assert row["launches_per_batch"]["fused_programs"] == (1 if row["batch"] <= 16 else 2)
    gpu = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert gpu.returncode != 0 and "needs a CUDA device" in gpu.stderr


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_the_gpu(tmp_path) -> None:
    """The interpreter accepts programs the compiler rejects (a loop variable that changes shape, say): compile
    every variant the runtime launches to sm_90 cubin, here without a GPU, with a fresh Triton cache."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "triton_aot.py"), "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, [x for x in lines if not x["ok"]] or r.stderr[-2000:]
    kernels = {x["kernel"].split()[0] for x in lines}
    assert kernels == {"masked_conv", "pixelcnn_decode", "gated_decode"} and len(lines) >= 10

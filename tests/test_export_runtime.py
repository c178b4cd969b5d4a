"""Train -> export -> sample on tiny models: parity of eager, ONNX and TorchScript; reproducible sampling;
bundle validation; the ONNX path without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genforge.cli.main import export_command, sample_command
from genforge.export import ExportError, export_run
from genforge.runtime import BundleError, InputError, load, read_bundle
from genforge.runtime.bundle import BUNDLE_VERSION
from genforge.train import load_run
from genforge.train.objectives import objective_for


@pytest.fixture(scope="module")
def runs(family_runs: dict[str, tuple[Path, Path]]) -> dict[str, tuple[Path, Path]]:
    """(run dir, bundle with both formats) for an unconditional PixelCNN and a conditional gated one, 8x8 with
    4 levels (the session's shared exports)."""
    return {"pixelcnn": family_runs["pixelcnn"], "gated-cond": family_runs["gated-pixelcnn"]}


@pytest.mark.parametrize("key", ["pixelcnn", "gated-cond"])
def test_forward_parity_eager_onnx_torchscript(runs, key: str, fresh_seed: int) -> None:
    run, bundle = runs[key]
    model, _ = load_run(run)
    g = torch.Generator().manual_seed(fresh_seed)  # fresh inputs every run
    x = torch.randint(0, 4, (5, 1, 8, 8), generator=g)
    labels = torch.randint(0, 10, (5,), generator=g) if key == "gated-cond" else None
    with torch.no_grad():
        eager = model(x, labels).numpy()
    for backend in ("onnx", "torchscript"):
        sampler = load(bundle, backend=backend, device="cpu")
        got = sampler.forward(x.numpy().astype(np.float32), None if labels is None else labels.numpy())
        np.testing.assert_allclose(got, eager, atol=1e-4, rtol=0, err_msg=backend)


def test_manifest_records_what_it_promises(runs) -> None:
    _, bundle = runs["gated-cond"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "genforge-bundle" and m["version"] == BUNDLE_VERSION and m["family"] == "autoregressive"
    assert m["image"] == {"channels": 1, "height": 8, "width": 8} and m["levels"] == 4 and m["num_classes"] == 10
    assert m["likelihood"] == "categorical" and m["opset"] == 18 and m["versions"]["torch"] == torch.__version__
    assert set(m["graphs"]) == {f"{g}.{f}" for g in ("forward", "step", "row", "window")
                                for f in ("onnx", "torchscript")} | {"sample.onnx", "step_updates.onnx"}
    assert m["decoders"] == ["naive", "cached", "graph"]
    step = m["graphs"]["step.onnx"]
    caches = [i for i in step["inputs"] if i["name"].startswith("cache_")]
    assert caches and [o["name"] for o in step["outputs"]] == ["log_probs"] + [
        "new_" + i["name"][len("cache_"):] for i in caches]
    g = m["graphs"]["forward.onnx"]
    assert [i["name"] for i in g["inputs"]] == ["x", "labels"] and g["inputs"][0]["shape"][0] == "batch"
    assert m["parity"].pop("sample.onnx")["mismatched_subpixels"] == 0  # images compared, not floats
    for key, check in m["parity"].items():
        assert 0 <= check["max_scaled_diff"] <= check["max_abs_diff"] and check["max_scaled_diff"] <= 1e-4, key
        assert check["tolerance"] == 1e-4, key
    # Format 8: one TorchScript archive whose methods are the graphs; ONNX tensors in the weights or onnx.data,
    # which is listed when some tensor needs it (none may: this tiny model's are inline or made from weights)
    assert set(m["files"]) - {"onnx.data"} == {
        f"{g}.onnx" for g in ("forward", "step", "row", "window", "sample", "step_updates")} | {
        "weights.safetensors", "graphs.pt"}
    assert ("onnx.data" in m["files"]) == (bundle / "onnx.data").exists()
    for key, g in m["graphs"].items():
        if g["format"] == "torchscript":
            assert g["file"] == "graphs.pt" and g["method"] == g["role"] == key.split(".")[0], key


@pytest.mark.parametrize("key", ["pixelcnn", "gated-cond"])
def test_same_seed_same_images_across_backends_and_batch_sizes(runs, key: str) -> None:
    run, bundle = runs[key]
    onnx = load(bundle, backend="onnx", device="cpu").sample(7, seed=3, batch_size=2)
    assert onnx.shape == (7, 8, 8, 1) and onnx.dtype == np.uint8 and onnx.max() < 4
    for backend, decoder, batch in (("torchscript", "cached", 7), ("onnx", "naive", 4), ("torchscript", "naive", 3)):
        other = load(bundle, backend=backend, device="cpu").sample(7, seed=3, batch_size=batch, decoder=decoder)
        np.testing.assert_array_equal(onnx, other, err_msg=f"{backend} {decoder} batch {batch}")
    # The tail of a run is the same images as a run started at that index.
    part = load(bundle, backend="onnx").sample(3, seed=3, start=4)
    np.testing.assert_array_equal(part, onnx[4:])
    assert not np.array_equal(onnx, load(bundle).sample(7, seed=4))
    # The training-time sample grid uses the same loop and randomness as the runtime.
    model, _ = load_run(run)
    labels = np.arange(7) % 10 if key == "gated-cond" else None
    eager = objective_for(model).sample(model, 7, 3, labels)
    np.testing.assert_array_equal(eager, onnx)


def test_log_prob_matches_the_model(runs, fresh_seed: int) -> None:
    run, bundle = runs["pixelcnn"]
    model, _ = load_run(run)
    images = np.random.default_rng(fresh_seed).integers(0, 4, (6, 8, 8, 1)).astype(np.uint8)
    with torch.no_grad():
        nll = model.nll(torch.from_numpy(images.transpose(0, 3, 1, 2)).long()).double().numpy()
    for backend in ("onnx", "torchscript"):
        lp = load(bundle, backend=backend).log_prob(images, batch_size=4)
        np.testing.assert_allclose(lp, -nll, rtol=1e-5)
    with pytest.raises(InputError, match=r"shape \(N, 8, 8, 1\)"):
        load(bundle).log_prob(images[:, :4])
    with pytest.raises(InputError, match=r"levels in \[0, 3\]"):
        load(bundle).log_prob(images + 4)


def test_completion_through_the_runtime(runs) -> None:
    _, bundle = runs["gated-cond"]
    images = np.random.default_rng(0).integers(0, 4, (5, 8, 8, 1)).astype(np.uint8)
    results = [load(bundle, backend=b).complete(images, 3, seed=1, decoder=d, batch_size=bs)
               for b, d, bs in (("onnx", "cached", 2), ("torchscript", "naive", 5))]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0][:, :3], images[:, :3])
    assert not np.array_equal(results[0][:, 3:], images[:, 3:])
    with pytest.raises(InputError, match=r"rows must be in \[0, 8\]"):
        load(bundle).complete(images, 9)


def test_labels_are_checked(runs) -> None:
    _, cond = runs["gated-cond"]
    _, plain = runs["pixelcnn"]
    with pytest.raises(InputError, match="unconditional"):
        load(plain).sample(2, labels=[0, 1])
    with pytest.raises(InputError, match=r"labels must lie in \[0, 9\]"):
        load(cond).sample(2, labels=[0, 10])
    a = load(cond).sample(4, seed=0, labels=[7, 7, 7, 7])
    b = load(cond).sample(4, seed=0, labels=[1, 1, 1, 1])
    assert not np.array_equal(a, b)


def _copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_bundles_are_rejected(runs, tmp_path: Path) -> None:
    _, bundle = runs["pixelcnn"]
    b = _copy_bundle(bundle, tmp_path / "tampered")
    raw = bytearray((b / "forward.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (b / "forward.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256 does not match"):
        load(b)
    t = _copy_bundle(bundle, tmp_path / "truncated")
    (t / "graphs.pt").write_bytes((t / "graphs.pt").read_bytes()[:100])
    with pytest.raises(BundleError, match=r"graphs\.pt: sha256 does not match"):
        read_bundle(t)
    v = _copy_bundle(bundle, tmp_path / "version")
    m = json.loads((v / "manifest.json").read_text())
    (v / "manifest.json").write_text(json.dumps({**m, "version": BUNDLE_VERSION + 1}))
    with pytest.raises(BundleError, match=f"version {BUNDLE_VERSION + 1} is not supported"):
        load(v)
    (v / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not a genforge bundle manifest"):
        load(v)
    (v / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt manifest"):
        load(v)
    (v / "manifest.json").write_text(json.dumps({**m, "files": {**m["files"], "../x": "0" * 64}}))
    with pytest.raises(BundleError, match="outside the bundle"):
        load(v)
    with pytest.raises(BundleError, match="no such bundle"):
        load(tmp_path / "nothing")


def test_export_fails_when_parity_fails(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import genforge.export.exporter as exporter

    run, _ = runs["pixelcnn"]
    real = exporter._run_exported
    monkeypatch.setattr(exporter, "_run_exported", lambda *a: [o + 1e-3 for o in real(*a)])
    # 1e-3 on every output, scaled by 1 + |log p| / 50 at the smallest |log p| (a few at most): 0.0009x-0.001.
    with pytest.raises(ExportError, match=r"differs from eager PyTorch by 0\.00(1 |09\d)"):
        export_run(run, tmp_path / "b")
    # No half-written bundle; only the (empty) lock file of the bundle path stays, as it must (files.exclusive_lock).
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == [".b.lock"]


def test_cli_export_and_sample(runs, tmp_path: Path) -> None:
    run, _ = runs["gated-cond"]
    r = CliRunner()
    res = r.invoke(export_command, [str(run), "--format", "torchscript", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    res = r.invoke(export_command, [str(run), "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "exists" in res.output
    res = r.invoke(sample_command, [str(tmp_path / "b"), "-n", "5", "--labels", "3", "--quiet", "-o",
                                    str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (5, 8, 8, 1) and z["images"].dtype == np.uint8 and int(z["levels"]) == 4
    res = r.invoke(sample_command, [str(tmp_path / "b"), "-n", "5", "--quiet", "-o", str(tmp_path / "g.png")])
    assert res.exit_code == 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    res = r.invoke(sample_command, [str(tmp_path / "b"), "--complete", str(tmp_path / "s.npz"), "--rows", "4",
                                    "--decoder", "naive", "--quiet", "-o", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s.npz") as a, np.load(tmp_path / "c.npz") as b:
        np.testing.assert_array_equal(a["images"][:, :4], b["images"][:, :4])
    res = r.invoke(sample_command, [str(tmp_path / "b"), "--rows", "4", "-o", str(tmp_path / "d.npz")])
    assert res.exit_code == 2 and "go together" in res.output
    res = r.invoke(sample_command, [str(tmp_path / "b"), "--backend", "onnx", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "no onnx graphs" in res.output
    (tmp_path / "b" / "graphs.pt").write_bytes(b"garbage")
    res = r.invoke(sample_command, [str(tmp_path / "b"), "-o", str(tmp_path / "y.png")])
    assert res.exit_code == 1 and "sha256 does not match" in res.output and "Traceback" not in res.output


SAMPLE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    {guard}
    from genforge.runtime import load
    s = load(sys.argv[1], backend="onnx", device="cpu")
    np.save(sys.argv[2], s.sample(4, seed=11, batch_size=3))
    assert "torch" not in sys.modules, "the ONNX path imported torch"
""")

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, _Block())
""")


def test_onnx_path_runs_with_torch_blocked(runs, tmp_path: Path) -> None:
    _, bundle = runs["pixelcnn"]
    script = tmp_path / "s.py"
    script.write_text(SAMPLE_SCRIPT.format(guard=BLOCK_TORCH))
    subprocess.run([sys.executable, str(script), str(bundle), str(tmp_path / "o.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), load(bundle).sample(4, seed=11))


@pytest.mark.skipif(not os.environ.get("GENFORGE_TORCHFREE_PYTHON"),
                    reason="set GENFORGE_TORCHFREE_PYTHON to the python of a venv with `pip install -e .` "
                           "(the runtime alone; .ci/run builds one)")
def test_onnx_path_in_an_environment_without_torch(runs, tmp_path: Path) -> None:
    python = os.environ["GENFORGE_TORCHFREE_PYTHON"]
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the torch-free environment has torch installed"
    _, bundle = runs["pixelcnn"]
    script = tmp_path / "s.py"
    script.write_text(SAMPLE_SCRIPT.format(guard=""))
    subprocess.run([python, str(script), str(bundle), str(tmp_path / "o.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), load(bundle).sample(4, seed=11))
    # The console script too: `pip install genforge` alone (numpy, onnxruntime, click, ...) runs gen-sample.
    gen_sample = Path(python).parent / "gen-sample"
    subprocess.run([str(gen_sample), str(bundle), "-n", "4", "--seed", "11", "--quiet", "-o", str(tmp_path / "s.npz")],
                   check=True)
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["images"], load(bundle).sample(4, seed=11))
    # The zoo ships with that install: its listing and its bundles by name.
    listing = subprocess.run([str(Path(python).parent / "gen-zoo")], check=True, capture_output=True, text=True)
    assert "zoo:pixelcnn-bmnist" in listing.stdout
    subprocess.run([str(gen_sample), "zoo:pixelcnn-bmnist", "-n", "2", "--seed", "3", "--quiet", "-o",
                    str(tmp_path / "z.npz")], check=True)
    with np.load(tmp_path / "z.npz") as z:
        np.testing.assert_array_equal(z["images"], load("zoo:pixelcnn-bmnist").sample(2, seed=3))


def test_gen_sample_command_runs_with_torch_blocked(runs, tmp_path: Path) -> None:
    _, bundle = runs["pixelcnn"]
    script = tmp_path / "cli.py"
    script.write_text("import sys\n" + BLOCK_TORCH + textwrap.dedent("""
        from genforge.cli.sample import sample_command
        sample_command([sys.argv[1], "-n", "3", "--backend", "onnx", "--quiet", "-o", sys.argv[2]],
                       standalone_mode=False)
        assert "torch" not in sys.modules
    """))
    subprocess.run([sys.executable, str(script), str(bundle), str(tmp_path / "s.npz")], check=True)
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["images"], load(bundle).sample(3))


def test_cached_decoding_split_between_threads_draws_the_same_images(runs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large ONNX batches decode in one thread per core (policy.cached_threads); the slices must come back
    in order with their own labels, prefixes and uniforms."""
    import genforge.runtime.policy as sampler

    _, bundle = runs["gated-cond"]
    s = load(bundle, backend="onnx", device="cpu")
    labels = np.arange(9) % 10
    one = s.sample(9, seed=5, labels=labels, batch_size=9)
    part = s.complete(one[::-1], 3, seed=2, labels=labels, batch_size=9)
    monkeypatch.setattr(sampler, "CACHED_THREAD_MIN_IMAGES", 4)
    monkeypatch.setattr(sampler.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert sampler.cached_threads(9, "onnx", "cpu") == 2 and sampler.cached_threads(12, "onnx", "cpu") == 3
    assert sampler.cached_threads(9, "torchscript", "cpu") == 1 and sampler.cached_threads(3, "onnx", "cpu") == 1
    np.testing.assert_array_equal(s.sample(9, seed=5, labels=labels, batch_size=9), one)
    np.testing.assert_array_equal(s.complete(one[::-1], 3, seed=2, labels=labels, batch_size=9), part)
    assert not np.array_equal(one[:4], one[4:8])  # the slices are different images

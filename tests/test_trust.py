"""Nothing lost, nothing silently wrong: what a new user met with bad inputs (issue 13), each as a test
through the commands (click's CliRunner runs the console scripts' own functions) or the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILY_MODELS
from helpers import edited_bundle, snapshot

from genforge.cli.main import eval_command, export_command, sample_command, train_command
from genforge.export import ExportError, export_run
from genforge.runtime import BundleError, InputError, RuntimeBackendError, load
from genforge.runtime.files import LOCK_FILE, LockError, exclusive_lock
from genforge.train import DataSpec, TrainConfig, TrainingError, UsageError, load_dataset, train_run
from genforge.train import checkpoint as ckpt
from genforge.train.evaluate import evaluate_path
from genforge.train.objectives import objective_for

TINY = {"hidden": 6, "layers": 1, "output_hidden": 6}
TINY_FLAGS = ["--set", "hidden=6", "--set", "layers=1", "--set", "output_hidden=6", "--levels", "4",
              "--batch-size", "32", "--samples", "0", "--eval-limit", "16", "--quiet"]


def tiny_run(out: Path, *, seed: int = 0, steps: int = 3) -> Path:
    return train_run(data=DataSpec(levels=4), model_overrides=TINY, out=out, progress=False,
                     train=TrainConfig(steps=steps, batch_size=32, n_samples=0, eval_limit=16, seed=seed)).run_dir


@pytest.fixture(scope="module")
def run_and_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trust")
    run = tiny_run(root / "run", seed=2)
    return run, export_run(run, root / "bundle", formats=("onnx",))


# ---------------------------------------------------------------- 1. gen-export never deletes what is not a bundle


def console_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (gen-train, gen-export, ...) as a user would."""
    return subprocess.run([str(Path(sys.executable).parent / name), *args], capture_output=True, text=True,
                          timeout=300)


def test_export_refuses_to_overwrite_the_run_it_reads(run_and_bundle, tmp_path: Path) -> None:
    run, _ = run_and_bundle
    before = snapshot(run)
    for target in (run, run.parent):  # the run itself, and a directory that holds it
        res = console_script("gen-export", str(run), "--overwrite", "-o", str(target))
        assert res.returncode == 1 and "over the run directory" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not res.stdout
    assert snapshot(run) == before


def test_export_refuses_to_overwrite_a_directory_that_is_not_a_bundle(run_and_bundle, tmp_path: Path) -> None:
    run, _ = run_and_bundle
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    res = CliRunner().invoke(export_command, [str(run), "--overwrite", "-o", str(mine)])
    assert res.exit_code == 1 and "not a genforge bundle" in res.output, res.output
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_export_overwrites_a_bundle_when_asked(run_and_bundle, tmp_path: Path) -> None:
    run, _ = run_and_bundle
    # TorchScript only: overwriting does not depend on the format, and it exports in a second, not twenty.
    first = export_run(run, tmp_path / "b", formats=("torchscript",))
    (first / "stale.txt").write_text("from the old bundle")
    with pytest.raises(ExportError, match="pass --overwrite"):
        export_run(run, tmp_path / "b", formats=("torchscript",))
    export_run(run, tmp_path / "b", formats=("torchscript",), overwrite=True)
    assert not (first / "stale.txt").exists() and load(first).sample(2, seed=1).shape == (2, 8, 8, 1)


# ---------------------------------------------------------------- 2. gen-eval scores the split the model never saw


@pytest.mark.parametrize("kind", ["run", "bundle"])
def test_eval_scores_the_split_carved_with_the_runs_own_seed(run_and_bundle, kind: str) -> None:
    run, bundle = run_and_bundle
    path = run if kind == "run" else bundle
    res = console_script("gen-eval", str(path), "--quiet")  # --seed left at 0: the run used seed 2
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["split"] == "test" and out["split_seed"] == 2 and "seed 2" in out["split_origin"]
    model, _ = ckpt.load_run(run)

    def nll(seed: int) -> float:
        test = load_dataset("digits", split="test", levels=4, seed=seed)
        x = torch.from_numpy(test.images.transpose(0, 3, 1, 2).copy()).long()
        with torch.no_grad():
            return float(model.nll(x).double().mean())

    assert out["images"] == len(load_dataset("digits", split="test", levels=4, seed=2))
    assert out["nats_per_image"] == pytest.approx(nll(2), rel=1e-5)
    assert abs(nll(0) - nll(2)) > 1e-3  # the seed-0 split (what gen-eval scored before) is another set of images
    train_idx, test_idx = _carved(2, "train"), _carved(2, "test")
    assert not set(train_idx) & set(test_idx) and set(_carved(0, "test")) & set(train_idx)


def _carved(seed: int, split: str) -> list[int]:
    """Indices of the digits' carved splits, computed independently of train/data.py's _carve."""
    perm = np.random.default_rng(seed).permutation(1797)
    n = round(0.1 * 1797)
    return sorted({"valid": perm[:n], "test": perm[n : 2 * n], "train": perm[2 * n :]}[split].tolist())


def test_eval_on_the_training_split_says_so(run_and_bundle) -> None:
    run, _ = run_and_bundle
    out = evaluate_path(run, split="train")
    assert "trained on this split" in out["warning"]


# ---------------------------------------------------------------- 3. --resume never drops a flag silently


def test_resume_refuses_flags_that_contradict_the_run(tmp_path: Path) -> None:
    out = tmp_path / "r"
    r = CliRunner()
    assert r.invoke(train_command, ["--out", str(out), "--steps", "2", "--lr", "0.003", *TINY_FLAGS]).exit_code == 0
    before = snapshot(out)
    for flags, name in ((["--lr", "0.01"], "--lr"), (["--model", "gated-pixelcnn"], "--model"),
                        (["--set", "hidden=16"], "--set hidden"), (["--data", "mnist"], "--data"),
                        (["--batch-size", "8"], "--batch-size")):
        res = r.invoke(train_command, ["--resume", "--out", str(out), "--steps", "4", "--quiet", *flags])
        assert res.exit_code == 1 and name in res.output and "disagrees" in res.output, (flags, res.output)
        assert len(res.output.strip().splitlines()) == 1
    res = console_script("gen-train", "--resume", "--out", str(out), "--lr", "0.01")  # and as a user runs it
    assert res.returncode == 1 and "--lr 0.01 disagrees" in res.stderr, res.stderr
    assert snapshot(out) == before
    # Flags that agree with the run are fine, and the length of training may change.
    res = r.invoke(train_command, ["--resume", "--out", str(out), "--steps", "4", "--lr", "0.003", "--set",
                                   "hidden=6", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 4


# ---------------------------------------------------------------- 4. one writer per directory


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    tiny_run(out)
    with exclusive_lock(out / LOCK_FILE, "test"):  # as a running gen-train holds it
        with pytest.raises(LockError, match="in use by another genforge process"):
            train_run(out=out, resume=True, extend={"steps": 4}, progress=False)
        res = CliRunner().invoke(train_command, ["--out", str(out), "--overwrite", "--steps", "1", *TINY_FLAGS])
        assert res.exit_code == 1 and f"pid {os.getpid()}" in res.output, res.output
    assert train_run(out=out, resume=True, extend={"steps": 4}, progress=False).steps == 4


@pytest.mark.slow
def test_two_gen_train_processes_on_one_directory(tmp_path: Path) -> None:
    """Real processes: the first holds the lock while it trains, the second fails at once."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "genforge.cli", "train", "--out", str(out), "--overwrite", *TINY_FLAGS]
    first = subprocess.Popen([*cmd, "--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # until the first holds the lock (it writes its pid into the file)
            lock = out / LOCK_FILE
            if lock.exists() and lock.read_text() == str(first.pid):
                break
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)
        second = subprocess.run([*cmd, "--steps", "2"], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "in use by another genforge process" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


def test_export_holds_the_bundle_directory_lock(run_and_bundle, tmp_path: Path) -> None:
    run, _ = run_and_bundle
    with exclusive_lock(tmp_path / ".b.lock", "test"), pytest.raises(LockError):
        export_run(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- 5. a NaN says what is true


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_loss(self, model, x, labels):
        return torch.tensor(float("nan"), requires_grad=True), {}

    tiny_run(tmp_path / "probe", steps=1)
    monkeypatch.setattr(type(objective_for(ckpt.load_run(tmp_path / "probe")[0])), "loss", nan_loss)
    with pytest.raises(TrainingError, match="no checkpoint had been written yet") as e:
        tiny_run(tmp_path / "r")
    assert "intact" not in str(e.value)


def test_nan_after_a_checkpoint_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_run(tmp_path / "r", steps=2)

    def nan_loss(self, model, x, labels):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(type(objective_for(ckpt.load_run(tmp_path / "r")[0])), "loss", nan_loss)
    with pytest.raises(TrainingError, match=r"last checkpoint \(step 2\).*is intact"):
        train_run(out=tmp_path / "r", resume=True, extend={"steps": 4}, progress=False)


# ---------------------------------------------------------------- one-line errors instead of tracebacks


@pytest.mark.parametrize("value, why", [("hidden=abc", "hidden must be an integer"),
                                        ("hidden=1e3", "hidden must be an integer"),
                                        ("layers=true", "layers must be an integer"),
                                        ("likelihood=3", "likelihood must be a string")])
def test_set_values_are_parsed_against_the_field_type(tmp_path: Path, value: str, why: str) -> None:
    res = CliRunner().invoke(train_command, ["--out", str(tmp_path / "r"), "--steps", "1", "--quiet",
                                             "--set", value])
    assert res.exit_code == 1 and why in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.parametrize("field, edit", [
    ("levels", lambda m: m.update(levels=7)),
    ("family", lambda m: m.update(family="diffusion")),
    ("family", lambda m: m.update(family="latent")),
    ("height", lambda m: m["image"].update(height=16)),
    ("height", lambda m: (m["image"].update(height=16), m["model_config"].update(height=16))),
])
def test_a_manifest_that_contradicts_its_graphs_is_refused(run_and_bundle, tmp_path: Path, field: str, edit) -> None:
    _, bundle = run_and_bundle
    edited = edited_bundle(bundle, tmp_path / "edited", edit)
    res = CliRunner().invoke(sample_command, [str(edited), "-n", "2", "--quiet", "-o", str(tmp_path / "s.npz")])
    assert res.exit_code == 1 and "Traceback" not in res.output and field in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.npz").exists()


def test_the_onnx_file_must_match_what_the_manifest_declares(run_and_bundle, tmp_path: Path) -> None:
    """Every declared shape edited consistently still disagrees with the graph file itself."""
    _, bundle = run_and_bundle

    def edit(m):
        m["image"]["height"] = m["model_config"]["height"] = 16
        for g in m["graphs"].values():
            for spec in [*g["inputs"], *g["outputs"]]:
                if spec["name"] in ("x", "log_probs") and len(spec["shape"]) >= 4:
                    spec["shape"][2] = 16
                if spec["name"] in ("uniforms", "prefix", "images"):  # sample.onnx: (batch, H, W, C)
                    spec["shape"][1] = 16
    edited = edited_bundle(bundle, tmp_path / "edited", edit)
    with pytest.raises(BundleError, match="weights were exported with"):  # format 7 binds model_config
        load(edited, backend="onnx")
    # Rebinding the weights to the edited fields (as anyone editing a bundle can) leaves the graph check.
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from genforge.runtime.bundle import BINDING_KEY, manifest_binding, sha256_file

    m = json.loads((edited / "manifest.json").read_text())
    with safe_open(str(edited / m["weights"]), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(edited / m["weights"]), metadata={**meta, BINDING_KEY: manifest_binding(m)})
    m["files"][m["weights"]] = sha256_file(edited / m["weights"])
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="in the graph but"):
        load(edited, backend="onnx").sample(1, decoder="naive")


def test_sample_arguments_are_checked(run_and_bundle) -> None:
    _, bundle = run_and_bundle
    s = load(bundle)
    for kw, why in (({"n": 2.5}, "n must be an integer"), ({"n": 2, "seed": "abc"}, "seed must be an integer"),
                    ({"n": True}, "n must be an integer"), ({"n": 2, "batch_size": 0}, r"batch_size must be in \[1, "),
                    ({"n": -1}, r"n must be in \[0, ")):
        with pytest.raises(InputError, match=why):
            s.sample(**kw)
    assert s.sample(np.int64(2), seed=np.int32(3)).shape == (2, 8, 8, 1)  # numpy integers are integers


def test_a_request_larger_than_memory_is_refused_up_front(run_and_bundle, tmp_path: Path) -> None:
    _, bundle = run_and_bundle
    with pytest.raises(InputError, match="GiB of memory available"):
        load(bundle).sample(10**12)
    res = CliRunner().invoke(sample_command, [str(bundle), "-n", str(10**12), "--quiet", "-o", str(tmp_path / "s.npz")])
    assert res.exit_code == 1 and "GiB" in res.output, res.output


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"), reason="a GPU is present")
def test_cuda_without_a_gpu_fails_in_load(run_and_bundle) -> None:
    _, bundle = run_and_bundle
    for backend in ("auto", "onnx", "torchscript"):
        with pytest.raises(RuntimeBackendError, match="no NVIDIA GPU"):
            load(bundle, backend=backend, device="cuda")


def test_complete_names_what_is_wrong_with_the_file(run_and_bundle, tmp_path: Path) -> None:
    _, bundle = run_and_bundle
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 1), np.uint8))
    (tmp_path / "t.npz").write_text("0 1 2 3\n")
    for f, why in ((tmp_path / "a.npy", "a bare .npy array"), (tmp_path / "t.npz", "not a .npz archive")):
        res = CliRunner().invoke(sample_command, [str(bundle), "--complete", str(f), "--rows", "2", "--quiet",
                                                  "-o", str(tmp_path / "o.png")])
        assert res.exit_code == 1 and why in res.output, res.output


# ---------------------------------------------------------------- the front door


def test_a_run_records_what_it_used(run_and_bundle) -> None:
    run, _ = run_and_bundle
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["name"] == "digits" and data["image_size"] is None and data["channels"] is None


def test_gen_train_ends_with_the_next_command(tmp_path: Path) -> None:
    res = CliRunner().invoke(train_command, ["--out", str(tmp_path / "r"), "--steps", "1", *TINY_FLAGS])
    assert res.exit_code == 0, res.output
    assert f"next: gen-export {tmp_path / 'r'} --format all -o bundles/r" in res.output


def test_cli_choices_come_from_the_library() -> None:
    from genforge.cli.common import BACKEND_CHOICES, MODEL_CHOICES
    from genforge.models import MODELS
    from genforge.runtime import BACKENDS

    assert MODEL_CHOICES == tuple(MODELS) and BACKEND_CHOICES == BACKENDS
    for command in (sample_command, eval_command):
        backend = next(p for p in command.params if p.name == "backend")
        assert tuple(backend.type.choices) == BACKENDS, command.name
    seed = next(p for p in eval_command.params if p.name == "seed")
    assert seed.help and "split" in seed.help


def test_help_and_argument_errors_do_not_import_torch() -> None:
    """--help answered in well under a second: the commands' module must not import torch to build itself."""
    code = ("import sys; from genforge.cli.main import train_command; "
            "train_command(['--help'], standalone_mode=False); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "genforge.cli", "train", "--model", "nope"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "'nope' is not one of" in res.stderr


def test_readme_outputs_are_ignored_by_git() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (root / "README.md").read_text()
    import re

    paths = set(re.findall(r"(?:-o|--out) ((?:runs|bundles|samples|done)[\w./-]*)", readme))
    assert {"bundles/gated", "samples.png"} <= paths
    res = subprocess.run(["git", "check-ignore", "--no-index", *sorted(paths)], cwd=root, capture_output=True,
                         text=True)
    assert sorted(res.stdout.split()) == sorted(paths), res.stdout


# ---------------------------------------------------------------- 6. trained models export at the default tolerance


@pytest.mark.parametrize("model, levels, likelihood", [("pixelcnn", 2, "bernoulli"),
                                                       ("gated-pixelcnn", 2, "bernoulli"),
                                                       ("gated-pixelcnn", 17, "logistic-mixture"),
                                                       ("pixelcnn", 17, "gaussian")])
@pytest.mark.slow
def test_a_trained_model_exports_at_the_default_tolerance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          model: str, levels: int, likelihood: str) -> None:
    """A hundred steps make the model confident (|logits| ~ 10), which is where the exported Log(Sigmoid)
    of F.logsigmoid lost ~1e-3 to onnxruntime's absolutely-accurate Sigmoid (issue 13, item 6)."""
    import torch.nn.functional as F

    import genforge.export.exporter as exporter
    from genforge.models import heads

    run = train_run(model=model, data=DataSpec(levels=levels), out=tmp_path / "run", progress=False,
                    model_overrides={"hidden": 16, "layers": 2, "output_hidden": 16, "likelihood": likelihood},
                    train=TrainConfig(steps=100, batch_size=32, lr=1e-2, n_samples=0, eval_limit=16)).run_dir
    bundle = export_run(run, tmp_path / "b")  # ONNX, at the default tolerance 1e-4: the exporter whose ops differ
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    # The sigmoid heads stay far inside the tolerance (measured ~2e-6); the gaussian's bin masses are
    # differences of nearby CDF values, and random step caches took it to 5e-5 at worst over 60 seeds.
    scaled = {k: p["max_scaled_diff"] for k, p in parity.items() if k != "sample.onnx"}  # that one: exact images
    assert max(scaled.values()) < (1e-4 if likelihood == "gaussian" else 1e-5), scaled
    if likelihood == "bernoulli":  # the control: the old formulation fails on this very model
        monkeypatch.setattr(heads, "log_sigmoid", F.logsigmoid)
        net = ckpt.load_run(run)[0].float().eval()
        forward = next(g for g in net.export_graphs() if g.name == "forward")
        exporter._export_onnx(forward, tmp_path / "old.onnx", forward.make_inputs(2, torch.Generator()), 17)
        worst = max(exporter.verify("onnx", tmp_path / "old.onnx", forward, batch=32, seed=s)["max_scaled_diff"]
                    for s in range(4))
        assert worst > 1e-4


# ---------------------------------------------------------------- threads and the remaining time


def test_threads_leave_the_busy_cores_to_the_jobs_that_hold_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from genforge.train import trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, want in ((0.0, 2), (1.0, 1), (2.0, 1), (7.0, 1)):
        monkeypatch.setattr(trainer, "busy_cores", lambda busy=busy: busy)
        n, why = trainer.choose_threads()
        assert n == want and (("busy with other jobs" in why) == (want < 2)), (busy, why)
    assert trainer.choose_threads(3)[0] == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS" in trainer.choose_threads()[1]


def test_busy_cores_sees_a_cpu_bound_process() -> None:
    from genforge.train.trainer import busy_cores

    if not Path("/proc/loadavg").exists():
        pytest.skip("no /proc/loadavg")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores() >= 1
    finally:
        hog.kill()
        hog.wait()


def test_plain_progress_lines_estimate_the_remaining_time(capsys: pytest.CaptureFixture[str]) -> None:
    from genforge.runtime.progress import Progress

    with Progress(100, "train", interval=0.0, initial=50) as bar:  # a resumed run: half done before it started
        time.sleep(0.3)
        bar.update(10)
        bar.update(40)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train: 60/100 [") and "left]" in lines[0]
    left = float(lines[0].split("~")[1].split("s left")[0])
    assert 1 <= left <= 3  # 10 steps took >= 0.3 s, so 40 more take >= 1.2 s; the 50 before do not count
    assert lines[-1].startswith("train: 100/100") and "left" not in lines[-1]


def test_a_version_1_bundle_still_loads_and_gen_eval_asks_for_its_data(run_and_bundle, tmp_path: Path) -> None:
    """Version 2 added optional fields only (docs/bundle.md): a version-1 manifest, which lacks them, loads;
    gen-eval, which cannot know its training data, says so rather than guessing a split."""
    _, bundle = run_and_bundle

    def to_v1(m):
        m["version"] = 1
        m["source"] = {k: v for k, v in m["source"].items() if k in ("run_dir", "ema")}
        for p in m["parity"].values():
            p.pop("max_scaled_diff", None)
    old = edited_bundle(bundle, tmp_path / "v1", to_v1)
    assert load(old).sample(2, seed=3).tolist() == load(bundle).sample(2, seed=3).tolist()
    with pytest.raises(UsageError, match="does not record the data it was trained on"):
        evaluate_path(old)
    assert evaluate_path(old, {"name": "digits", "levels": 4})["split_seed"] == 0  # --data given: its seed


def test_exportable_heads_are_accurate_where_the_plain_formulas_cancel() -> None:
    """The heads' exportable forms (no Expm1, no Erfc in ONNX) against exact references in float64, and in
    float32 where bin masses are tiny differences (wide Gaussians: the first version erred by ~1 nat)."""
    import math

    from genforge.models.heads import DiscretizedGaussianHead, log_erfc, log_one_minus_exp, log_sigmoid

    x = torch.linspace(-30, 30, 601, dtype=torch.float64)
    exact = torch.tensor([-math.log1p(math.exp(-v)) if v > 0 else v - math.log1p(math.exp(v)) for v in x.tolist()],
                         dtype=torch.float64)
    torch.testing.assert_close(log_sigmoid(x), exact, rtol=0, atol=1e-12)
    w = torch.logspace(-9, 1.5, 400, dtype=torch.float64)
    torch.testing.assert_close(log_one_minus_exp(w), torch.log(-torch.expm1(-w)), rtol=1e-9, atol=0)
    v = torch.linspace(-5, 9, 300, dtype=torch.float64)
    exact_erfc = torch.tensor([math.log(math.erfc(t)) for t in v.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log_erfc(v), exact_erfc, rtol=2e-7, atol=2e-7)  # Numerical Recipes' fit: 1.2e-7

    head = DiscretizedGaussianHead(17)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    seed = g.initial_seed()
    scale = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 2, 1, 1, 1)
    params = torch.randn(500, 2, 1, 1, 1, generator=g, dtype=torch.float64) * scale
    ref = head.log_probs(params)
    mean, inv_s = params[:, 0].flatten().tolist(), torch.exp(-params[:, 1].clamp(min=-7.0)).flatten().tolist()
    cdf = [[0.5 * math.erfc(-((2 * k + 1) / 16 - 1 - m) * s / math.sqrt(2)) for k in range(16)] for m, s in
           zip(mean, inv_s, strict=True)]
    mass = torch.tensor([[c[0], *[b - a for a, b in zip(c[:-1], c[1:], strict=True)], 1 - c[-1]] for c in cdf],
                        dtype=torch.float64)
    ok = mass > 1e-6  # where a float64 difference of CDFs is itself exact to ~1e-10
    torch.testing.assert_close(ref.reshape(500, 17)[ok], mass.log()[ok], rtol=0, atol=1e-6, msg=f"seed {seed}")
    f32 = head.log_probs(params.float()).double()
    assert float(((f32 - ref).abs() / (1 + ref.abs() / 50)).max()) < 1e-3, f"seed {seed}"


def test_a_failing_test_reports_its_fresh_seed(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text("def test_fails(fresh_seed):\n    assert fresh_seed < 0\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and "1 failed" in res.stdout
    seed = res.stdout.split("rerun with GENFORGE_TEST_SEED=")[1].split()[0]
    rerun = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**os.environ, "GENFORGE_TEST_SEED": seed})
    assert f"seed {seed}:" in rerun.stdout  # the same seed again, on demand


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_runs_and_bundles_get_the_modes_the_umask_allows(tmp_path: Path, umask: int) -> None:
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the published files must not keep those modes,
    or a service running as another user cannot read a bundle its deployment copied in (issue 15, item 7)."""
    import stat

    old = os.umask(umask)
    try:
        run = tiny_run(tmp_path / "run", steps=1)
        # TorchScript only: every format's files are written into the same staging directory, whose mode is
        # what this checks, and the ONNX export would triple the test's time.
        bundle = export_run(run, tmp_path / "bundle", formats=("torchscript",))
    finally:
        os.umask(old)
    for root in (run, bundle):
        for p in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert mode == want, (str(p), oct(mode), oct(want))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_the_manifest_lists_exactly_what_each_onnx_file_takes_and_returns(family_bundles, name: str) -> None:
    """Read from the files, not from the exporter's intentions (issue 15, item 3, for the ONNX graphs)."""
    import onnx

    bundle = family_bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.DOUBLE: "float64",
              onnx.TensorProto.UINT8: "uint8"}

    def signature(values) -> list[dict[str, object]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": dtypes[t.elem_type], "shape": shape})
        return out

    onnx_graphs = {k: g for k, g in manifest["graphs"].items() if g["format"] == "onnx"}
    assert onnx_graphs
    for key, g in onnx_graphs.items():
        proto = onnx.load(bundle / g["file"])
        initializers = {i.name for i in proto.graph.initializer}
        inputs = [v for v in proto.graph.input if v.name not in initializers]
        for declared, real in ((g["inputs"], signature(inputs)), (g["outputs"], signature(proto.graph.output))):
            assert [d["name"] for d in declared] == [r["name"] for r in real], key
            for d, r in zip(declared, real, strict=True):
                assert d["dtype"] == r["dtype"], (key, d, r)
                # Dimensions the file fixes must be the manifest's; named ones must be dynamic in the file.
                assert len(d["shape"]) == len(r["shape"]), (key, d, r)
                for dd, rd in zip(d["shape"], r["shape"], strict=True):
                    assert (dd in ("batch", "rows") and isinstance(rd, str)) or dd == rd, (key, d, r)



def test_a_row_graph_that_drops_caches_is_declared_as_it_is(family_bundles, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The case that broke clients: the TorchScript-based ONNX exporter drops the caches the gated row never
    reads. Forced onto that exporter, the manifest lists exactly the file's inputs, and the state says which
    caches the row writes without reading."""
    import genforge.export.exporter as exporter

    monkeypatch.setattr(exporter, "onnx_exporters", lambda opset: ("torchscript-based",))
    run = json.loads((family_bundles["gated-pixelcnn"] / "manifest.json").read_text())["source"]["run_dir"]
    m = json.loads((export_run(run, tmp_path / "b", formats=("onnx", "torchscript")) / "manifest.json").read_text())
    row, row_ts = m["graphs"]["row.onnx"], m["graphs"]["row.torchscript"]
    assert row["exporter"] == "torchscript-based" and len(row["inputs"]) < len(row_ts["inputs"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "b" / "row.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in row["inputs"]]
    unread = {s["cache"] for s in row["state"] if s["input"] is None}
    assert unread and all(f"cache_{c}" not in [i.name for i in sess.get_inputs()] for c in unread)
    np.testing.assert_array_equal(load(tmp_path / "b").sample(2, seed=3, labels=[1, 2]),
                                  load(family_bundles["gated-pixelcnn"]).sample(2, seed=3, labels=[1, 2]))

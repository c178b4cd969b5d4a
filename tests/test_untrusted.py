"""A bundle is untrusted input (issue 23): no graph reaches the file system, no path leaves the bundle, no
replacement loses data, no edited field silently changes a result, and bad input is one clear error.

Hostile inputs are built here from the session's exported bundles (conftest.family_bundles); each test of a
hostile graph first shows the graph really does what it is meant to (a control run outside genforge), so a
refusal is a refusal of something real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import snapshot

from genforge.cli.main import eval_command, export_command, sample_command, train_command
from genforge.export import export_run
from genforge.runtime import BundleError, InputError, RuntimeBackendError, load
from genforge.runtime.bundle import read_bundle, sha256_file
from genforge.runtime.files import clean_dead_siblings
from genforge.runtime.torchscript_check import FORMER_EXPORTS_ONLY, TORCHSCRIPT_OPS, check_module, module_ops
from genforge.train import DataSpec, TrainConfig, train_run

pytestmark = pytest.mark.slow  # hostile bundles of every family, fuzzing, killed exports: about 6 minutes

CLEAN = (BundleError, InputError, RuntimeBackendError)
TINY = {"hidden": 6, "layers": 1, "output_hidden": 6}
TINY_FLAGS = ["--set", "hidden=6", "--set", "layers=1", "--set", "output_hidden=6", "--levels", "4",
              "--batch-size", "16", "--samples", "0", "--eval-limit", "16", "--quiet"]
BIN = Path(sys.executable).parent


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def manifest(b: Path) -> dict[str, Any]:
    return json.loads((b / "manifest.json").read_text())


def write_manifest(b: Path, m: dict[str, Any]) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def rehash(b: Path, add: tuple[str, ...] = ()) -> None:
    """Recompute the manifest's hashes, as anyone who edits a bundle can."""
    m = manifest(b)
    m["files"] = {n: sha256_file(b / n) for n in sorted({*m["files"], *add})}
    write_manifest(b, m)


def archive(b: Path, graph: str = "forward") -> str:
    """The TorchScript archive holding ``graph`` (format 8: one archive, every graph a method)."""
    return str(manifest(b)["graphs"][f"{graph}.torchscript"]["file"])


def only_torchscript(b: Path) -> Path:
    """Drop the ONNX graphs, so backend="auto" picks TorchScript (as the issue's attack did)."""
    m = manifest(b)
    onnx_files = {g["file"] for k, g in m["graphs"].items() if k.endswith(".onnx")}
    m["graphs"] = {k: g for k, g in m["graphs"].items() if not k.endswith(".onnx")}
    m["decoders"] = [d for d in m["decoders"] if d != "graph"]
    m["files"] = {k: v for k, v in m["files"].items() if k not in onnx_files}
    for f in onnx_files:
        (b / f).unlink()
    write_manifest(b, m)
    return b


def images_for(sampler: Any, n: int = 3, seed: int = 0) -> np.ndarray:
    h, w, c = sampler.image_shape
    return np.random.default_rng(seed).integers(0, sampler.levels, (n, h, w, c)).astype(np.uint8)


def one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) >= 1 and "Traceback" not in text, text
    return lines[-1]


# ---------------------------------------------------------------- 1. graphs that touch files


def file_touching_module(kind: str, victim: Path, created: Path) -> torch.jit.ScriptModule:
    """A scripted graph with the manifest's signature that overwrites the first bytes of ``victim`` and
    creates ``created`` (torch.from_file with shared=True maps the file writable)."""

    class Forward(torch.nn.Module):
        def __init__(self, victim: str, created: str) -> None:
            super().__init__()
            self.victim, self.created = victim, created

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
            t.fill_(88)
            u = torch.from_file(self.created, shared=True, size=4, dtype=torch.uint8)
            return torch.zeros(x.shape[0], 1, 8, 8, 4) - 1.3862943611198906 + (t.sum() + u.sum()).float() * 0

    class Window(torch.nn.Module):
        def __init__(self, victim: str, created: str) -> None:
            super().__init__()
            self.victim, self.created = victim, created

        def forward(self, x_rows: torch.Tensor, advance: torch.Tensor, cache_input: torch.Tensor,
                    cache_block0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
            t.fill_(88)
            u = torch.from_file(self.created, shared=True, size=4, dtype=torch.uint8)
            lp = torch.zeros(x_rows.shape[0], 1, 1, 8, 4) - 1.3862943611198906 + (t.sum() + u.sum()).float() * 0
            return lp, cache_input, cache_block0

        @torch.jit.export
        def window(self, x_rows: torch.Tensor, advance: torch.Tensor, cache_input: torch.Tensor,
                   cache_block0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.forward(x_rows, advance, cache_input, cache_block0)

    cls = Forward if kind == "forward" else Window
    return torch.jit.script(cls(str(victim), str(created)))


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    victim = tmp_path / "user-file.txt"
    victim.write_text("precious data")
    return victim


def test_a_torchscript_forward_that_touches_files_is_refused(family_bundles, tmp_path: Path, canary: Path) -> None:
    control_created = tmp_path / "control-created.bin"
    control_victim = tmp_path / "control-victim.txt"
    control_victim.write_text("precious data")
    evil = file_touching_module("forward", control_victim, control_created)
    evil(torch.zeros(1, 1, 8, 8))  # the control: run outside genforge, the graph writes and creates files
    assert control_victim.read_text().startswith("XXXX") and control_created.exists()

    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    created = tmp_path / "created.bin"
    file_touching_module("forward", canary, created).save(str(b / archive(b)))
    rehash(b)
    s = load(b, backend="torchscript")
    with pytest.raises(BundleError, match="aten::from_file"):
        s.log_prob(images_for(s))
    only_torchscript(b)
    result = CliRunner().invoke(eval_command, [str(b), "--limit", "8"])
    assert result.exit_code != 0 and "aten::from_file" in one_line(result.output)
    assert canary.read_text() == "precious data" and not created.exists()


def test_a_torchscript_window_graph_that_touches_files_is_refused_by_gen_sample(
        family_bundles, tmp_path: Path, canary: Path) -> None:
    b = only_torchscript(copy_bundle(family_bundles["pixelcnn"], tmp_path / "b"))
    created = tmp_path / "created.bin"
    file_touching_module("window", canary, created).save(str(b / archive(b, "window")))
    rehash(b)
    out = tmp_path / "x.png"
    # backend auto picks TorchScript (no ONNX graph); auto decoding at batch 4 runs the window graph
    result = CliRunner().invoke(sample_command, [str(b), "-n", "4", "-o", str(out), "--quiet"])
    assert result.exit_code != 0 and archive(b, "window") in one_line(result.output), result.output
    assert canary.read_text() == "precious data" and not created.exists() and not out.exists()


def test_a_torchscript_setstate_is_refused_before_it_runs(family_bundles, tmp_path: Path) -> None:
    class Stateful(torch.nn.Module):
        def __init__(self, created: str) -> None:
            super().__init__()
            self.created = created
            self.buf = torch.zeros(4, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 1, 8, 8, 4)

        @torch.jit.export
        def __getstate__(self) -> tuple[str, bool]:
            return self.created, self.training

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]) -> None:
            self.created = state[0]
            self.training = state[1]
            # kept in an attribute: the compiler drops a call whose result nothing uses
            self.buf = torch.from_file(state[0], shared=True, size=4, dtype=torch.uint8)

    control = tmp_path / "control.bin"
    torch.jit.script(Stateful(str(control))).save(str(tmp_path / "control.pt"))
    assert not control.exists()  # saving does not run __setstate__; loading does:
    torch.jit.load(str(tmp_path / "control.pt"))
    assert control.exists()

    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    created = tmp_path / "created.bin"
    torch.jit.script(Stateful(str(created))).save(str(b / archive(b)))
    rehash(b)
    s = load(b, backend="torchscript")
    with pytest.raises(BundleError, match="__setstate__"):
        s.log_prob(images_for(s))
    assert not created.exists()


def test_the_allowlist_covers_every_exported_graph_and_no_more(family_bundles, tmp_path: Path) -> None:
    """Every TorchScript graph the exporter writes (each family, each head, Bernoulli included) passes the
    inspection, and every operation of the allowlist appears in some export: a new operation in an export
    fails here, and the list holds nothing an export does not need."""
    extra = []  # beyond the session's bundles: the other heads, and conditional latent models (one_hot)
    latent = {"latent_size": 4, "hidden": 8}
    for model, overrides, levels, conditional in (
            ("pixelcnn", TINY, 2, False), ("gated-pixelcnn", {**TINY, "likelihood": "gaussian"}, 8, True),
            ("row-lstm", {**TINY, "likelihood": "gaussian"}, 8, False), ("autoencoder", latent, 4, True),
            ("vae", latent, 4, True), ("gan", latent, 4, True)):
        run = train_run(model=model, data=DataSpec(levels=levels, conditional=conditional), model_overrides=overrides,
                        out=tmp_path / f"{model}-{levels}", progress=False,
                        train=TrainConfig(steps=1, batch_size=16, n_samples=0, eval_limit=8))
        extra.append(export_run(run.run_dir, tmp_path / f"{model}-{levels}-bundle", formats=("torchscript",)))
    assert manifest(extra[0])["likelihood"] == "bernoulli"
    seen: set[str] = set()
    for b in [*family_bundles.values(), *extra]:
        for file in sorted({g["file"] for g in manifest(b)["graphs"].values() if g["format"] == "torchscript"}):
            module = torch.jit.load(str(b / file))
            ops = set().union(*module_ops(module).values())
            assert ops <= TORCHSCRIPT_OPS, f"{b.name}/{file}: {sorted(ops - TORCHSCRIPT_OPS)}"
            check_module(module, b / file)
            seen |= ops
    assert seen == TORCHSCRIPT_OPS - FORMER_EXPORTS_ONLY, sorted(TORCHSCRIPT_OPS - FORMER_EXPORTS_ONLY - seen)


def test_a_conditional_graph_in_an_unconditional_bundle_is_refused(family_bundles, tmp_path: Path) -> None:
    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    shutil.copy(family_bundles["gated-pixelcnn"] / archive(b), b / archive(b))  # its forward takes (x, labels)
    rehash(b)
    s = load(b, backend="torchscript")
    with pytest.raises(BundleError, match="inputs"):
        s.log_prob(images_for(s))


def _fails_when_run(path: Path, name: str) -> None:
    """Route graph input ``name`` through a reshape to (4099, -1) and back: the graph loads (the batch is
    symbolic, so no shape check can see it), and fails when it runs, unless the batch is a multiple of 4099."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    for node in g.node:
        node.input[:] = [f"{name}/back" if i == name else i for i in node.input]
    dims = [d.dim_value for d in next(i for i in g.input if i.name == name).type.tensor_type.shape.dim][1:]
    g.initializer.extend([numpy_helper.from_array(np.array([4099, -1], np.int64), f"{name}/odd"),
                          numpy_helper.from_array(np.array([-1, *dims], np.int64), f"{name}/shape")])
    g.node.insert(0, helper.make_node("Reshape", [f"{name}/odd/out", f"{name}/shape"], [f"{name}/back"]))
    g.node.insert(0, helper.make_node("Reshape", [name, f"{name}/odd"], [f"{name}/odd/out"]))
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("graph, input_name", [("forward", "x"), ("step", "x_row")])
def test_a_graph_that_fails_only_when_it_runs_is_one_clear_error(family_bundles, tmp_path: Path, graph: str,
                                                                 input_name: str) -> None:
    """A rehashed graph that onnxruntime loads but cannot run (the mutation tests flipped a byte of a reshape's
    shape) is refused in one line naming its file, by the API and by gen-eval, not with onnxruntime's own
    exception."""
    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    _fails_when_run(b / f"{graph}.onnx", input_name)
    rehash(b)
    s = load(b, backend="onnx")
    with pytest.raises(BundleError, match=rf"{graph}\.onnx: onnxruntime failed running the graph \(") as e:
        if graph == "forward":
            s.log_prob(np.zeros((2, 8, 8, 1), np.uint8))
        else:
            s.sample(2, seed=0, decoder="cached")
    assert len(str(e.value).splitlines()) == 1
    if graph == "forward":
        result = CliRunner().invoke(eval_command, [str(b), "--limit", "8", "--backend", "onnx"])
        assert result.exit_code == 1 and one_line(result.output).startswith("Error:"), result.output
        assert "onnxruntime failed running the graph" in result.output


# ---------------------------------------------------------------- 2. paths stay inside the bundle


def test_a_symlinked_graph_or_directory_is_refused(family_bundles, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    shutil.move(b / "forward.onnx", outside / "forward.onnx")
    (b / "forward.onnx").symlink_to(outside / "forward.onnx")  # the same bytes: the hash still matches
    with pytest.raises(BundleError, match="symbolic link"):
        load(b)
    b2 = externalized(copy_bundle(family_bundles["pixelcnn"], tmp_path / "b2"))
    shutil.move(b2 / "ext", outside / "ext")
    (b2 / "ext").symlink_to(outside / "ext", target_is_directory=True)
    with pytest.raises(BundleError, match="symbolic link"):
        load(b2)
    (b2 / "ext").unlink()
    shutil.move(outside / "ext", b2 / "ext")
    load(b2, backend="onnx")  # the control: the same bundle with its directory in place loads


def externalized(b: Path, graph: str = "forward.onnx", location: str = "ext/forward.bin") -> Path:
    """The bundle with ``graph``'s weights moved to an external-data file, listed and hashed."""
    import onnx

    (b / location).parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(b / graph))
    onnx.save_model(model, str(b / graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=256)  # shape constants stay inline for onnxruntime
    rehash(b, add=(location,))
    return b


def set_external_location(b: Path, graph: str, location: str) -> None:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(b / graph), load_external_data=False)
    for t in _get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(b / graph))


def test_external_data_is_hashed_and_stays_inside_the_bundle(family_bundles, tmp_path: Path) -> None:
    ref = load(family_bundles["pixelcnn"], backend="onnx")
    x = images_for(ref)
    b = externalized(copy_bundle(family_bundles["pixelcnn"], tmp_path / "b"))
    np.testing.assert_array_equal(load(b, backend="onnx").log_prob(x), ref.log_prob(x))

    edited = copy_bundle(b, tmp_path / "edited")  # an edited .bin beside forward.onnx changed log_prob
    raw = bytearray((edited / "ext/forward.bin").read_bytes())
    raw[:4] = b"\x00\x00\x80\x7f"
    (edited / "ext/forward.bin").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        load(edited)

    unlisted = copy_bundle(b, tmp_path / "unlisted")
    m = manifest(unlisted)
    del m["files"]["ext/forward.bin"]
    write_manifest(unlisted, m)
    with pytest.raises(BundleError, match="not a file the manifest lists"):
        load(unlisted)

    secret = tmp_path / "outside.bin"
    shutil.copy(b / "ext/forward.bin", secret)
    for location in ("../outside.bin", str(secret), "ext/../../outside.bin"):
        away = copy_bundle(b, tmp_path / f"away{len(location)}")
        set_external_location(away, "forward.onnx", location)
        rehash(away)
        with pytest.raises(BundleError, match="outside the bundle"):
            load(away)


def test_a_graph_swapped_after_load_is_not_run(family_bundles, tmp_path: Path) -> None:
    for backend, graph in (("onnx", "forward.onnx"), ("torchscript", "graphs.pt")):
        b = copy_bundle(family_bundles["pixelcnn"], tmp_path / backend)
        s = load(b, backend=backend)
        expected = load(family_bundles["pixelcnn"], backend=backend)
        (b / graph).write_bytes(b"not the graph that was verified")
        x = images_for(s)
        np.testing.assert_array_equal(s.log_prob(x), expected.log_prob(x))


def test_gen_eval_never_opens_the_data_path_a_bundle_names(family_bundles, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("TOP-SECRET-LINE\n")
    opened: list[str] = []

    def watch(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) and WATCH:
            opened.append(os.fsdecode(args[0]))

    WATCH.append(True)
    add_hook(watch)
    try:
        for name in ("digits", "folder", "binarized-mnist"):
            b = copy_bundle(family_bundles["pixelcnn"], tmp_path / name)
            m = manifest(b)
            m["source"]["data"] = {**m["source"]["data"], "name": name, "path": str(secret)}
            write_manifest(b, m)
            result = CliRunner().invoke(eval_command, [str(b)])
            assert result.exit_code != 0 and "--data-path" in one_line(result.output), result.output
            assert "TOP-SECRET" not in result.output
    finally:
        WATCH.clear()
    assert not [p for p in opened if Path(p).resolve() == secret], opened


WATCH: list[bool] = []
_HOOKS: list[Any] = []


def add_hook(fn: Any) -> None:
    """sys.addaudithook cannot be undone, so one hook is installed and delegates to the current watcher."""
    if not _HOOKS:
        sys.addaudithook(lambda event, args: _HOOKS[-1](event, args) if _HOOKS else None)
    _HOOKS.append(fn)


# ---------------------------------------------------------------- 3. replacing is atomic; nothing is lost


def hidden_siblings(path: Path) -> list[str]:
    """What a writer left beside ``path`` (its lock file stays by design: docs/bundle.md, Layout)."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*") if p.name != f".{path.name}.lock")


def tiny_run(out: Path, *, steps: int = 2, seed: int = 0) -> Path:
    return train_run(data=DataSpec(levels=4), model_overrides=TINY, out=out, progress=False,
                     train=TrainConfig(steps=steps, batch_size=16, n_samples=0, eval_limit=8, seed=seed)).run_dir


def test_overwrite_keeps_a_directory_that_is_not_only_a_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "README").write_text("my project\n")
    (project / "config.json").write_text('{"mine": true}\n')
    before = snapshot(project)
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "1", "--out", str(project), "--overwrite"])
    assert result.exit_code != 0 and "refusing to overwrite" in one_line(result.output)
    assert snapshot(project) == before
    run = tiny_run(tmp_path / "run")  # a real run with a file of the user's in it is kept too
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(run)
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "1", "--out", str(run), "--overwrite"])
    assert result.exit_code != 0 and "notes.txt" in one_line(result.output)
    assert snapshot(run) == before


def test_an_empty_output_path_is_refused(family_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "1", "--out", "", "--overwrite"])
    assert result.exit_code != 0 and "empty" in one_line(result.output)
    run_dir, _ = family_runs["pixelcnn"]
    result = CliRunner().invoke(export_command, [str(run_dir), "-o", "", "--overwrite"])
    assert result.exit_code != 0 and "empty" in one_line(result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_failed_overwrite_keeps_the_old_run_whole(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    before = snapshot(run)
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "3", "--lr", "1e30", "--out", str(run),
                                                "--overwrite"])
    assert result.exit_code != 0 and "still holds the run it held before" in one_line(result.output), result.output
    assert {k: v for k, v in snapshot(run).items() if k != ".genforge.lock"} == {
        k: v for k, v in before.items() if k != ".genforge.lock"}
    assert hidden_siblings(run) == []
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "3", "--seed", "5", "--out", str(run),
                                                "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 5 and hidden_siblings(run) == []


def test_export_overwrite_swaps_and_cleans_what_dead_writers_left(family_runs, tmp_path: Path) -> None:
    run_dir, _ = family_runs["gan"]
    out = export_run(run_dir, tmp_path / "b", formats=("torchscript",))
    old_manifest = manifest(out)
    (tmp_path / ".b.staging-1-aaaaaa").mkdir()  # a killed export's staging directory (its lock is free)
    (tmp_path / ".b.staging-1-aaaaaa" / "half.pt").write_bytes(b"x")
    (tmp_path / ".b.old-1-bbbbbb").mkdir()  # a killed replacement's old directory, the new one in place
    export_run(run_dir, out, formats=("onnx", "torchscript"), overwrite=True)
    assert hidden_siblings(out) == []
    assert manifest(out)["graphs"].keys() != old_manifest["graphs"].keys()
    read_bundle(out)


def test_a_kill_between_the_renames_loses_nothing(family_runs, tmp_path: Path) -> None:
    """Without an atomic exchange a replacement renames the old bundle aside, then the new one in; a kill
    between the two leaves only the old one, aside: the next writer puts it back."""
    _, bundle = family_runs["gan"]
    out = tmp_path / "b"
    shutil.copytree(bundle, tmp_path / ".b.old-7-cccccc")
    before = snapshot(tmp_path / ".b.old-7-cccccc")
    clean_dead_siblings(out)
    assert snapshot(out) == before and hidden_siblings(out) == []


def test_an_old_bundle_that_cannot_be_deleted_is_kept_aside_with_a_warning(
        family_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = family_runs["gan"]
    out = export_run(run_dir, tmp_path / "b", formats=("torchscript",))
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("x")
    real = shutil.rmtree

    def undeletable_sub(path: Any, *args: Any, **kw: Any) -> None:
        """As a user who cannot delete the read-only sub/ (root deletes anything, so it is simulated)."""
        p = Path(path)
        if not (p / "sub" / "f").exists():
            return real(path, *args, **kw)
        for child in p.iterdir():
            if child.name != "sub":
                child.unlink() if child.is_file() else real(child)
        error = PermissionError(13, "Permission denied")
        if "onexc" in kw:
            kw["onexc"](os.unlink, str(p / "sub" / "f"), error)
        else:
            kw["onerror"](os.unlink, str(p / "sub" / "f"), (PermissionError, error, None))
        return None

    monkeypatch.setattr(shutil, "rmtree", undeletable_sub)
    with pytest.warns(UserWarning, match="kept at"):
        export_run(run_dir, out, formats=("onnx",), overwrite=True)
    assert sorted(manifest(out)["graphs"]) == ["generate.onnx"]  # the new bundle is in place, whole
    read_bundle(out)
    kept = [tmp_path / n for n in hidden_siblings(out)]
    assert len(kept) == 1 and (kept[0] / "sub" / "f").exists()


def _wait_for(predicate: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_during_export_publishes_nothing(family_runs, tmp_path: Path) -> None:
    run_dir, _ = family_runs["pixelcnn"]
    out = tmp_path / "b"
    proc = subprocess.Popen([str(BIN / "gen-export"), str(run_dir), "-o", str(out), "--format", "onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Interrupt once the first graph is written: torch.export is then at work on the others.
    assert _wait_for(lambda: any(p.glob("*.onnx") for p in tmp_path.glob(".b.staging-*")), 240)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, output
    assert not out.exists() and hidden_siblings(out) == [], output


def test_sigkill_during_export_overwrite_leaves_the_old_bundle_or_the_new(family_runs, tmp_path: Path,
                                                                         fresh_seed: int) -> None:
    run_dir, _ = family_runs["gan"]
    out = export_run(run_dir, tmp_path / "b", formats=("torchscript",))
    rng = np.random.default_rng(fresh_seed)
    for delay in rng.uniform(0.5, 6.0, size=3):
        proc = subprocess.Popen([str(BIN / "gen-export"), str(run_dir), "-o", str(out), "--format", "all",
                                 "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        proc.kill()
        proc.wait()
        read_bundle(out)  # whole: the old bundle or the new one, never neither
    export_run(run_dir, out, formats=("onnx",), overwrite=True)
    assert hidden_siblings(out) == [] and sorted(manifest(out)["graphs"]) == ["generate.onnx"]


# ---------------------------------------------------------------- 4. no silent wrong results


@pytest.mark.parametrize("values, why", [(np.full((4, 784), 0.7), "other than 0 and 1"),
                                         (np.full((4, 784), np.nan), "other than 0 and 1"),
                                         (np.linspace(0, 1, 4 * 784).reshape(4, 784), "other than 0 and 1")])
def test_binarized_mnist_arrays_must_be_binary(tmp_path: Path, values: np.ndarray, why: str) -> None:
    from genforge.train import DataError, load_dataset

    path = tmp_path / "bm.npz"
    np.savez(path, train=values, valid=values, test=values)
    with pytest.raises(DataError, match=why):
        load_dataset("binarized-mnist", split="train", path=str(path))


def test_dynamic_binarization_trains_a_binary_model_and_scores_one_fixed_draw(tmp_path: Path) -> None:
    flags = ["--set", "hidden=6", "--set", "layers=1", "--set", "output_hidden=6", "--batch-size", "16",
             "--samples", "0", "--eval-limit", "16", "--quiet", "--steps", "2", "--dynamic-binarize"]
    result = CliRunner().invoke(train_command, [*flags, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]
    assert cfg["levels"] == 2 and cfg["likelihood"] == "bernoulli"
    a = json.loads(CliRunner().invoke(eval_command, [str(tmp_path / "run"), "--limit", "20"]).output.splitlines()[-1])
    b = json.loads(CliRunner().invoke(eval_command, [str(tmp_path / "run"), "--limit", "20"]).output.splitlines()[-1])
    assert a["nats_per_image"] == b["nats_per_image"] and "binarized once" in a["split_origin"]
    result = CliRunner().invoke(train_command, [*flags, "--set", "levels=4", "--out", str(tmp_path / "r2")])
    assert result.exit_code != 0 and "2-level" in one_line(result.output)
    binary = tmp_path / "bm.npz"
    x = (np.random.default_rng(0).random((40, 784)) < 0.3).astype(np.uint8)
    np.savez(binary, train=x, valid=x, test=x)
    result = CliRunner().invoke(train_command, [*flags, "--data", "binarized-mnist", "--data-path", str(binary),
                                                "--out", str(tmp_path / "r3")])
    assert result.exit_code != 0 and "already" in one_line(result.output)


@pytest.mark.parametrize("shift", [-1, 1])
def test_an_edited_step_updates_offset_is_refused(family_bundles, tmp_path: Path, shift: int) -> None:
    b = copy_bundle(family_bundles["pixelcnn"], tmp_path / "b")
    m = manifest(b)
    spans = [u for u in m["graphs"]["step_updates.onnx"]["updates"] if u["kind"] == "span"]
    spans[0]["offset"] += shift
    write_manifest(b, m)
    s = load(b, backend="onnx")
    with pytest.raises(BundleError, match="step_updates"):
        s.sample(8, batch_size=8, decoder="cached")
    ref = load(family_bundles["pixelcnn"], backend="onnx")  # the control: the bundle as exported samples
    np.testing.assert_array_equal(ref.sample(8, batch_size=8, decoder="cached"),
                                  ref.sample(8, batch_size=8, decoder="naive"))


@pytest.mark.parametrize("name, edit, field", [
    ("gan", lambda m: (m.update(levels=8), m["model_config"].update(levels=8)), "model_config.levels"),
    ("vae", lambda m: m["prior"]["mean"].__setitem__(0, 3.0), "prior"),
    ("vae", lambda m: m.update(latent_size=3), "latent_size"),
    ("pixelcnn", lambda m: m["model_config"].update(hidden=7), "model_config.hidden"),
])
def test_manifest_fields_no_graph_states_are_bound_to_the_weights(family_bundles, tmp_path: Path, name: str,
                                                                   edit: Any, field: str) -> None:
    b = copy_bundle(family_bundles[name], tmp_path / "b")
    m = manifest(b)
    edit(m)
    write_manifest(b, m)
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        load(b)


def test_gen_eval_says_where_a_bundles_split_seed_comes_from(family_bundles) -> None:
    result = CliRunner().invoke(eval_command, [str(family_bundles["pixelcnn"]), "--limit", "8"])
    assert result.exit_code == 0, result.output
    assert "manifest" in json.loads(result.output.splitlines()[-1])["split_seed_from"]


# ---------------------------------------------------------------- 5. bounds and one-line errors


@pytest.mark.parametrize("flags, why", [
    (["--set", "layers=100000000"], "layers"), (["--set", "kernel=999"], "kernel"), (["--set", "kernel=4"], "odd"),
    (["--set", "kernel=0"], "kernel"), (["--set", "hidden=100000"], "hidden"),
    (["--set", "hidden=4096", "--set", "layers=200"], "parameters|GiB"),
])
def test_absurd_sizes_are_refused_before_anything_is_built(tmp_path: Path, flags: list[str], why: str) -> None:
    t0 = time.monotonic()
    result = CliRunner().invoke(train_command, ["--levels", "4", "--steps", "1", "--quiet", *flags,
                                                "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and pytest.importorskip("re").search(why, one_line(result.output)), result.output
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("flags", [["--image-size", "0"], ["--image-size", "100000"], ["--seed", str(2**64)],
                                   ["--steps", "0"], ["--seed", "-1"]])
def test_out_of_range_training_flags_are_usage_errors(tmp_path: Path, flags: list[str]) -> None:
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, *flags, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and not (tmp_path / "r").exists(), result.output


def test_n_mix_must_be_positive(tmp_path: Path) -> None:
    result = CliRunner().invoke(train_command, ["--data", "folder", "--data-path", str(tmp_path), "--set",
                                                "likelihood=logistic-mixture", "--set", "n_mix=0", "--steps", "1"])
    assert result.exit_code != 0 and "n_mix" in one_line(result.output), result.output


def test_a_hand_edited_config_is_one_line_on_resume(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    original = json.loads((run / "config.json").read_text())
    for edit, why in ((lambda c: c["train"].update(typo=1), "typo"),
                      (lambda c: c["train"].update(batch_size="16"), "batch_size"),
                      (lambda c: c["train"].update(lr=-1.0), "lr")):
        c = json.loads(json.dumps(original))
        edit(c)
        (run / "config.json").write_text(json.dumps(c))
        result = CliRunner().invoke(train_command, ["--out", str(run), "--resume", "--steps", "4", "--quiet"])
        assert result.exit_code != 0 and why in one_line(result.output), result.output
    (run / "config.json").write_text(json.dumps(original))
    result = CliRunner().invoke(train_command, ["--out", str(run), "--resume", "--steps", "1", "--quiet"])
    assert result.exit_code != 0 and "past the 1 steps" in one_line(result.output)


def test_a_deeply_nested_manifest_is_a_bundle_error(family_bundles, tmp_path: Path) -> None:
    b = copy_bundle(family_bundles["gan"], tmp_path / "b")
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[:-1].rstrip().rstrip("}") + ', "deep": ' + "[" * 100000 + "]" * 100000
                                     + "}")
    with pytest.raises(BundleError, match=r"nested too deeply|corrupt"):
        load(b)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: what a decompression bomb looks like to a reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def test_a_decompression_bomb_png_is_a_data_error(tmp_path: Path) -> None:
    from genforge.train import DataError, load_dataset

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bomb.png").write_bytes(png_claiming(100000, 100000))
    with pytest.raises(DataError, match="decompression bomb"):
        load_dataset("folder", split="train", path=str(tmp_path / "imgs"), image_size=8)


def test_a_stale_torchrun_environment_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    args = [str(BIN / "gen-train"), *TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "r")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1 and "WORLD_SIZE=2" in one_line(p.stderr), p.stderr
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0",
               GENFORGE_DIST_TIMEOUT="3")
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1 and "could not join" in one_line(p.stderr), p.stderr
    assert "joining the process group" in p.stderr and time.monotonic() - t0 < 60


def test_the_python_api_raises_its_own_errors(family_bundles) -> None:
    ar = load(family_bundles["pixelcnn"], backend="onnx")
    vae = load(family_bundles["vae"], backend="onnx")
    gan = load(family_bundles["gan"], backend="onnx")
    cond = load(family_bundles["gated-pixelcnn"], backend="onnx")  # class-conditional: labels are checked
    x = images_for(ar)
    calls = [
        lambda: ar.sample(2, seed=2**64), lambda: ar.sample(2, seed=-1), lambda: ar.sample(2.5),
        lambda: cond.sample(2, labels=["a", "b"]), lambda: cond.sample(2, labels=[2**70, 1]),
        lambda: cond.log_prob(x[:2], labels=[1.7, 2.2]), lambda: ar.log_prob(x, batch_size=0),
        lambda: ar.log_prob(x, batch_size=1.5), lambda: ar.sample(2, batch_size=True),
        lambda: cond.sample(2, labels=[1.7, 2.2]), lambda: gan.generate(np.full((2, 4), np.nan)),
        lambda: gan.generate(np.array([["a"] * 4])), lambda: vae.decode(np.zeros((2, 4)), seed=-1),
        lambda: vae.decode(np.full((2, 4), np.inf)), lambda: vae.sample(2, mode="median"),
        lambda: vae.interpolate(x[:1], x[1:2], steps=2.5), lambda: vae.interpolate(x[:1], x[1:2], steps=10**15),
        lambda: ar.sample(10**15), lambda: ar.sample(2, start=2**63),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(InputError):
            call()
            pytest.fail(f"call {i} raised nothing")
    for bad in (None, 123, "", b"bytes"):
        with pytest.raises(BundleError):
            load(bad)  # type: ignore[arg-type]


def test_a_huge_batch_runs_as_bounded_batches_with_the_same_result(family_bundles,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """decode() of 10^7 latents at once got the process killed in onnxruntime's allocator: a batch past
    MAX_BATCH_SUBPIXELS is split, which changes no image (each image's randomness is its own)."""
    import genforge.runtime.sampler as sampler_module

    vae = load(family_bundles["vae"], backend="onnx")
    z = np.random.default_rng(0).standard_normal((50, 4))
    whole = vae.decode(z, batch_size=50, mode="sample", seed=3)
    monkeypatch.setattr(sampler_module, "MAX_BATCH_SUBPIXELS", 7 * 64)  # 7 images of 8x8 a call
    calls: list[int] = []
    run = vae.backend.run
    monkeypatch.setattr(vae.backend, "run",
                        lambda g, feed: calls.append(len(next(iter(feed.values())))) or run(g, feed))
    np.testing.assert_array_equal(vae.decode(z, batch_size=10**9, mode="sample", seed=3), whole)
    assert max(calls) == 7 and sum(calls) == 50


def test_misleading_messages_are_gone(family_bundles, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(sample_command, [str(family_bundles["gan"]), "-n", "2", "-o",
                                                 str(tmp_path / "afile" / "x.png"), "--overwrite", "--quiet"])
    assert result.exit_code == 1 and "pass --overwrite" not in result.output, result.output
    result = CliRunner().invoke(sample_command, [str(family_bundles["pixelcnn"]), "-n", "2", "--mode", "sample",
                                                 "-o", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "--mode" in result.output
    spaced = tmp_path / "my runs" / "a b"
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "1", "--out", str(spaced)])
    assert result.exit_code == 0, result.output
    nxt = next(x for x in result.output.splitlines() if x.startswith("next:"))
    assert f"'{spaced}'" in nxt
    # Where nothing can be written (/proc, as a read-only file system would be): one line from each command.
    run_dir = spaced
    for command, args in ((sample_command, [str(family_bundles["gan"]), "-n", "2", "-o", "/proc/genforge-x.png"]),
                          (export_command, [str(run_dir), "-o", "/proc/genforge-bundle"]),
                          (train_command, [*TINY_FLAGS, "--steps", "1", "--out", "/proc/genforge-run"])):
        result = CliRunner().invoke(command, [*args, "--quiet"] if command is sample_command else args)
        assert result.exit_code == 1 and one_line(result.output).startswith("Error:"), result.output


@pytest.mark.parametrize("what", ["weights", "state"])
def test_a_full_disk_while_checkpointing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     what: str) -> None:
    import errno

    import genforge.train.checkpoint as ckpt

    def no_space(*_args: Any, **_kw: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torch_save_on_a_full_disk(*_args: Any, **_kw: Any) -> None:  # what torch.save raised in the issue
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed; unexpected pos 1024 vs 512")

    if what == "weights":
        monkeypatch.setattr(ckpt, "atomic_write_bytes", no_space)
    else:
        monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    result = CliRunner().invoke(train_command, [*TINY_FLAGS, "--steps", "2", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "disk" in one_line(result.output), result.output


# ---------------------------------------------------------------- the fuzz test

ROOT = Path(__file__).resolve().parent.parent
DELETE = object()


def manifest_paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field of a manifest, containers and leaves."""
    out = [path] if path else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += manifest_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += manifest_paths(v, (*path, i))
    return out


def mutants(value: Any, rng: np.random.Generator, k: int = 2) -> list[Any]:
    pool: list[Any] = [DELETE, None, "x", -1, 0, 2**40, True, 1.5, [], {}, float("nan")]
    if isinstance(value, bool):
        pool += [not value]
    elif isinstance(value, int):
        pool += [value + 1, value - 1, value * 2, str(value)]
    elif isinstance(value, float):
        pool += [value * 2, -value, value + 1e-3]
    elif isinstance(value, str):
        pool += [value + "x", "", "../" + value, value.upper()]
    elif isinstance(value, list) and value:
        pool += [value[:-1], value + value[:1], value[::-1]]
    elif isinstance(value, dict) and value:
        pool += [dict(list(value.items())[:-1])]
    picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[int(i)] for i in picks]


def set_path(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if value is DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def exercise(s: Any) -> dict[str, np.ndarray]:
    """What a user asks of a sampler; the same calls on the bundle as exported are the reference."""
    if s.bundle.family == "autoregressive":
        return {"sample": s.sample(3, seed=1, batch_size=3), "log_prob": s.log_prob(images_for(s))}
    if s.bundle.family == "gan":
        return {"sample": s.sample(3, seed=1)}
    return {"sample": s.sample(3, seed=1, mode="sample"), "encode": s.encode(images_for(s))[0]}


def attempt(b: Path, backend: str) -> dict[str, np.ndarray] | BaseException:
    try:
        return exercise(load(b, backend=backend))
    except CLEAN as e:
        assert str(e).strip() and len(str(e).strip().splitlines()) == 1, repr(e)
        return e


def plausible(out: dict[str, np.ndarray], s: dict[str, np.ndarray]) -> bool:
    """A rehashed file that changes the weights makes another model: its results need only be well formed."""
    return all(out[k].shape == s[k].shape and out[k].dtype == s[k].dtype for k in s)


@pytest.mark.parametrize("name, backend", [("pixelcnn", "onnx"), ("pixelcnn", "torchscript"), ("gan", "onnx"),
                                           ("vae", "onnx"), ("gated-pixelcnn", "onnx")])
def test_mutated_bundles_work_as_exported_or_fail_with_one_clear_error(
        family_bundles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_seed: int, name: str,
        backend: str) -> None:
    """Every manifest field (a random sample of them, two mutations each, from a fresh seed), truncated,
    flipped and swapped files, symbolic links and external data, through load / sample / log_prob and
    gen-eval: each either gives exactly the bundle's own results (or, where a rehashed file makes another
    model, well-formed ones) or raises one clear error; and nothing outside the sandbox is opened."""
    rng = np.random.default_rng(fresh_seed)
    src = family_bundles[name]
    reference = exercise(load(src, backend=backend))
    ref_eval = json.loads(CliRunner().invoke(eval_command, [str(src), "--limit", "8", "--backend", backend])
                          .output.splitlines()[-1])
    sandbox = tmp_path.resolve()
    monkeypatch.setattr("tempfile.tempdir", str(sandbox))
    installed = {str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, ROOT)}
    allowed = (*installed, "/proc", "/sys", "/dev", "/usr", "/lib", "/etc", str(sandbox))
    strays: list[str] = []
    active: list[bool] = []  # only while genforge runs: the test's own copying reads the source bundle

    def watch(event: str, args: tuple[Any, ...]) -> None:
        if active and event == "open" and args and isinstance(args[0], (str, bytes)):
            p = os.path.realpath(os.fsdecode(args[0]))
            if not p.startswith(allowed):
                strays.append(p)

    add_hook(watch)
    outcomes = {"same": 0, "refused": 0, "other model": 0}
    try:
        base = manifest(src)
        paths = manifest_paths(base)
        chosen = [p for p in paths if len(p) == 1] + [paths[int(i)] for i in
                                                      rng.choice(len(paths), size=min(60, len(paths)), replace=False)]
        cases: list[tuple[str, Any]] = []
        for path in chosen:
            for value in mutants(_get(base, path), rng):
                cases.append((f"manifest {path} -> {value!r}", ("manifest", path, value)))
        for f in base["files"]:
            cases += [(f"truncated {f}", ("truncate", f, False)), (f"truncated, rehashed {f}", ("truncate", f, True)),
                      (f"byte flipped, rehashed {f}", ("flip", f, True)), (f"symlinked {f}", ("symlink", f, None))]
        graphs = [g["file"] for g in base["graphs"].values()]
        for _ in range(3):
            a, b2 = rng.choice(len(graphs), size=2, replace=False)
            cases.append((f"swapped {graphs[a]} and {graphs[b2]}", ("swap", graphs[int(a)], graphs[int(b2)])))
        if backend == "onnx":
            cases += [("external data inside", ("external", "ext/w.bin", None)),
                      ("external data outside", ("external", "../w.bin", None))]
        for i, (what, case) in enumerate(cases):
            b = copy_bundle(src, tmp_path / f"m{i}")
            rehashed = mutate(b, case, sandbox)
            monkeypatch.setattr("tempfile.tempdir", str(sandbox))
            active.append(True)
            got = attempt(b, backend)
            active.clear()
            if isinstance(got, BaseException):
                outcomes["refused"] += 1
            elif all(np.array_equal(got[k], reference[k]) for k in reference):
                outcomes["same"] += 1
            else:
                assert rehashed, f"{what}: results differ from the bundle as exported, and no error"
                assert plausible(got, reference), what
                outcomes["other model"] += 1
            if case[0] in ("truncate", "symlink") and not case[2]:
                assert isinstance(got, BaseException), f"{what}: loaded"
            if i % 12 == 0:  # gen-eval too, on a share of the cases
                active.append(True)
                result = CliRunner().invoke(eval_command, [str(b), "--limit", "8", "--backend", backend])
                active.clear()
                if result.exit_code == 0:
                    scored = json.loads(result.output.splitlines()[-1])
                    same = {k: v for k, v in scored.items() if isinstance(v, float)} == {
                        k: v for k, v in ref_eval.items() if isinstance(v, float)}
                    assert rehashed or same, (what, scored, ref_eval)
                else:
                    assert result.exit_code == 1 and result.output.strip(), (what, result.exit_code, result.output,
                                                                             repr(result.exception))
                    assert one_line(result.output).startswith("Error:"), (what, result.output)
            shutil.rmtree(b)
    finally:
        _HOOKS.remove(watch)
    assert not strays, sorted(set(strays))[:5]
    assert outcomes["refused"] > 0 and outcomes["same"] > 0, outcomes


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def mutate(b: Path, case: tuple[Any, ...], sandbox: Path) -> bool:
    """Apply one mutation to the bundle copy ``b``; True when file contents changed under a new hash."""
    kind = case[0]
    if kind == "manifest":
        m = manifest(b)
        set_path(m, case[1], case[2])
        write_manifest(b, m)
        return False
    if kind in ("truncate", "flip"):
        raw = bytearray((b / case[1]).read_bytes())
        if kind == "truncate":
            raw = raw[: len(raw) // 2]
        else:
            raw[len(raw) // 2] ^= 0x5A
        (b / case[1]).write_bytes(bytes(raw))
        if case[2]:
            rehash(b)
        return bool(case[2])
    if kind == "symlink":
        outside = sandbox / f"outside-{b.name}-{Path(case[1]).name}"
        shutil.move(b / case[1], outside)
        (b / case[1]).symlink_to(outside)
        return False
    if kind == "swap":
        x, y = (b / case[1]).read_bytes(), (b / case[2]).read_bytes()
        (b / case[1]).write_bytes(y)
        (b / case[2]).write_bytes(x)
        rehash(b)
        return True
    graph = next(g["file"] for g in manifest(b)["graphs"].values() if g["format"] == "onnx")
    externalized(b, graph, "ext/w.bin")
    if case[1] != "ext/w.bin":
        shutil.copy(b / "ext/w.bin", sandbox / "w.bin")
        set_external_location(b, graph, case[1])
        rehash(b)
    return False

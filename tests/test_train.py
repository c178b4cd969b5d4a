"""The trainer on tiny configs: it learns, resumes exactly, writes atomically, and fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genforge.runtime.files import atomic_open, atomic_write_json
from genforge.train import DataSpec, TrainConfig, Trainer, TrainingError, UsageError, load_run, train_run
from genforge.train import checkpoint as ckpt
from genforge.train.objectives import objective_for

TINY_MODEL = {"hidden": 8, "layers": 1, "output_hidden": 8}


def tiny_train(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=16, lr=3e-3, n_samples=0, log_every=1, checkpoint_every=4, eval_limit=32)
    return TrainConfig(**{**base, **kw})


def losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_training_lowers_the_loss_and_writes_the_run(tmp_path: Path) -> None:
    r = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=40, n_samples=4), out=tmp_path / "run",
                  progress=False)
    assert r.steps == 40
    ls = [v for _, v in losses(r.run_dir)]
    assert np.mean(ls[-5:]) < np.mean(ls[:5]) - 5.0
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl"):
        assert (r.run_dir / name).exists()
    assert r.samples is not None and r.samples.suffix == ".png"
    model, run = load_run(r.run_dir)
    assert run.model == "pixelcnn" and model.config.levels == 17
    assert "nats_per_image" in r.metrics and "bits_per_dim" in r.metrics
    assert r.metrics["bits_per_dim"] == pytest.approx(r.metrics["nats_per_image"] / (64 * np.log(2)))


@pytest.mark.parametrize("model", ["pixelcnn", "gated-pixelcnn"])
def test_resume_repeats_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    full = train_run(model=model, model_overrides=TINY_MODEL, train=tiny_train(), out=tmp_path / "full",
                     progress=False)

    original = Trainer.batch

    def dying_batch(self: Trainer, step: int):
        if step == 6:  # after the checkpoint at step 4: steps 5-6 are lost and must be redone identically
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train_run(model=model, model_overrides=TINY_MODEL, train=tiny_train(), out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(Trainer, "batch", original)
    resumed = train_run(out=tmp_path / "cut", resume=True, progress=False)

    assert losses(resumed.run_dir) == losses(full.run_dir)  # bit-for-bit, with no duplicated steps
    a, _ = load_run(full.run_dir)
    b, _ = load_run(resumed.run_dir)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_resume_can_extend_a_finished_run(tmp_path: Path) -> None:
    train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=4), out=tmp_path / "r", progress=False)
    r = train_run(out=tmp_path / "r", resume=True, extend={"steps": 8}, progress=False)
    assert r.steps == 8 and [s for s, _ in losses(r.run_dir)] == list(range(1, 9))


def test_output_directory_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(UsageError, match="exists and is not empty"):
        train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=1), out=out, progress=False)
    with pytest.raises(UsageError, match="not a genforge run"):
        train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=1), out=out, overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "keep"


def test_nan_loss_stops_with_the_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=4), out=tmp_path / "r", progress=False)
    before = (tmp_path / "r" / ckpt.STATE_FILE).read_bytes()

    def nan_loss(self, model, x, labels):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(type(objective_for(load_run(tmp_path / "r")[0])), "loss", nan_loss)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        train_run(out=tmp_path / "r", resume=True, extend={"steps": 8}, progress=False)
    assert (tmp_path / "r" / ckpt.STATE_FILE).read_bytes() == before


def test_foreign_files_are_refused_without_running_code(tmp_path: Path) -> None:
    train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=2), out=tmp_path / "r", progress=False)
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "genforge-trainer-state", "x": Boom()}, tmp_path / "r" / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or foreign trainer state"):
        train_run(out=tmp_path / "r", resume=True, progress=False)
    assert not marker.exists()
    (tmp_path / "r" / ckpt.WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or foreign weights"):
        load_run(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["version"] = 99
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="version 99 is not supported"):
        load_run(tmp_path / "r")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_data_that_does_not_match_the_model(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="levels must be in"):
        train_run(model_overrides={**TINY_MODEL, "levels": 300}, train=tiny_train(steps=1), out=tmp_path / "a",
                  progress=False)
    with pytest.raises(UsageError, match="the training data has 17 levels, the model expects 4"):
        train_run(model_overrides={**TINY_MODEL, "levels": 4}, train=tiny_train(steps=1), out=tmp_path / "b",
                  progress=False)
    with pytest.raises(UsageError, match="class labels"):
        np.savez(tmp_path / "b.npz", train=np.zeros((40, 28, 28), np.uint8))
        train_run(data=DataSpec("binarized-mnist", path=str(tmp_path / "b.npz"), conditional=True),
                  train=tiny_train(steps=1), out=tmp_path / "c", progress=False)


def test_conditional_training_and_samples(tmp_path: Path) -> None:
    r = train_run(model="gated-pixelcnn", data=DataSpec(conditional=True, levels=4),
                  model_overrides=TINY_MODEL, train=tiny_train(steps=3, n_samples=10), out=tmp_path / "r",
                  progress=False)
    model, _ = load_run(r.run_dir)
    assert model.config.num_classes == 10 and r.samples is not None


@pytest.mark.slow
def test_ema_weights_are_kept_evaluated_and_exported(tmp_path: Path) -> None:
    from genforge.export import export_run
    from genforge.runtime import load

    # A constant schedule, so that a 4-step run extended to 10 continues exactly the 10-step run.
    r = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=10, ema=0.9, schedule="constant"),
                  out=tmp_path / "r", progress=False)
    live, _ = load_run(r.run_dir)
    ema, _ = load_run(r.run_dir, ema=True)
    assert any(not torch.equal(a, b) for a, b in zip(live.state_dict().values(), ema.state_dict().values(),
                                                      strict=True))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 17, (3, 1, 8, 8)))
    bundle = export_run(r.run_dir, tmp_path / "b", ema=True)
    with torch.no_grad():
        expected = ema(x).numpy()
    got = load(bundle).forward(x.numpy().astype(np.float32), None)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Resuming restores the average too: the final EMA equals an uninterrupted run's.
    train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=4, ema=0.9, schedule="constant"),
              out=tmp_path / "s", progress=False)
    s = train_run(out=tmp_path / "s", resume=True, extend={"steps": 10}, progress=False)
    resumed, _ = load_run(s.run_dir, ema=True)
    for (k, a), b in zip(ema.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_tensorboard_scalars_and_images_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorboard is optional: with a SummaryWriter importable, scalars and sample grids reach it."""
    import sys
    import types

    calls: list[tuple[str, str]] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            calls.append(("init", log_dir))

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append(("scalar", tag))

        def add_image(self, tag: str, img: np.ndarray, step: int, dataformats: str) -> None:
            assert img.ndim == 3 and dataformats == "HWC"
            calls.append(("image", tag))

        def flush(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=3, n_samples=4), out=tmp_path / "r", progress=False)
    tags = {t for kind, t in calls if kind != "init"}
    assert {"train/loss", "valid/nats_per_image", "samples"} <= tags
    assert calls[0] == ("init", str(tmp_path / "r" / "tb"))


def test_empty_data_set_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", train=np.zeros((0, 28, 28), np.uint8), valid=np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(UsageError, match="the data set is empty"):
        train_run(data=DataSpec("binarized-mnist", path=str(tmp_path / "e.npz")), train=tiny_train(steps=1),
                  out=tmp_path / "r", progress=False)


def test_a_version_1_run_config_moves_its_family_options_to_objective(tmp_path: Path) -> None:
    """Run format 2 keeps a family's options (kl_warmup_steps, iw_samples, gan_k, gan_loss) under
    "objective"; a version-1 config.json, which had them in "train", still loads and resumes."""
    r = train_run(model="vae", model_overrides={"latent_size": 4, "hidden": 8, "depth": 1},
                  train=tiny_train(steps=2), objective={"iw_samples": 3, "gan_k": 5}, out=tmp_path / "v",
                  progress=False)
    cfg = json.loads((r.run_dir / "config.json").read_text())
    assert cfg["version"] == 2  # the VAE's options only
    assert cfg["objective"] == {"kl_warmup_steps": 0, "iw_samples": 3, "iw_train": 0}
    assert "iw_samples" not in cfg["train"]
    v1_options = {k: v for k, v in cfg["objective"].items() if k in ckpt.V1_OBJECTIVE_KEYS}  # iw_train came later
    old = {**cfg, "version": 1, "train": {**cfg["train"], **v1_options}}
    del old["objective"]
    (r.run_dir / "config.json").write_text(json.dumps(old))
    run = ckpt.read_run_config(r.run_dir)
    assert run.objective == {"kl_warmup_steps": 0, "iw_samples": 3} and "iw_samples" not in run.train
    resumed = train_run(out=r.run_dir, resume=True, extend={"steps": 3}, progress=False)
    assert resumed.steps == 3 and resumed.metrics["iw_samples"] == 3


def test_cpu_bf16_autocast_trains_like_float32(tmp_path: Path) -> None:
    """--cpu-bf16: bfloat16 autocast on a CPU with native bf16, float32 weights and likelihood; the losses of
    the first steps match float32 training to bf16 precision (elsewhere the flag changes nothing)."""
    from safetensors.numpy import load_file

    from genforge.train.trainer import cpu_has_bf16

    losses = {}
    for bf16 in (False, True):
        run = train_run(data=DataSpec(levels=4), model_overrides={"hidden": 16, "layers": 2, "output_hidden": 16},
                        out=tmp_path / str(bf16), progress=False,
                        train=TrainConfig(steps=4, batch_size=16, n_samples=0, eval_limit=16, log_every=1,
                                          cpu_bf16=bf16))
        recs = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[bf16] = [r["loss"] for r in recs if "loss" in r]
        assert {a.dtype for a in load_file(str(run.run_dir / "model.safetensors")).values()} == {np.dtype("float32")}
    assert len(losses[True]) == 4 and all(np.isfinite(losses[True]))
    if cpu_has_bf16():
        assert losses[True] != losses[False]  # autocast really ran
        np.testing.assert_allclose(losses[True], losses[False], rtol=2e-2)
    else:
        assert losses[True] == losses[False]


def test_the_best_evaluation_is_kept_and_patience_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """model_best.safetensors holds the weights of the evaluation with the lowest held-out NLL (the moving
    average, where the run keeps one); --patience 2 stops two epochs after it, and a resumed run stays
    stopped."""
    scripted = iter([5.0, 3.0, 4.0, 4.5, 1.0, 0.5])
    evaluated: list[dict[str, torch.Tensor]] = []

    def scores(self: Trainer, data, limit: int = 0) -> dict[str, float]:
        evaluated.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return {"nats_per_image": next(scripted)}

    monkeypatch.setattr(Trainer, "evaluate", scores)
    cfg = tiny_train(steps=60, batch_size=512, ema=0.5, patience=2, checkpoint_every=0)
    r = train_run(model_overrides=TINY_MODEL, train=cfg, out=tmp_path / "r", progress=False)
    recs = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [x for x in recs if x.get("split") == "valid"]
    assert [x["nats_per_image"] for x in valid] == [5.0, 3.0, 4.0, 4.5]  # stopped after epoch 4
    assert [bool(x.get("best")) for x in valid] == [True, True, False, False]
    stop = [x for x in recs if x.get("early_stop")]
    assert len(stop) == 1 and stop[0]["best_step"] == valid[1]["step"] and r.steps == valid[3]["step"] < 60
    best, _ = load_run(r.run_dir, weights="best")
    for k, v in best.state_dict().items():
        assert torch.equal(v, evaluated[1][k]), k
    ema, _ = load_run(r.run_dir, ema=True)  # the average at the end differs from the best one
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), best.state_dict().values(),
                                                      strict=True))
    record = ckpt.best_record(r.run_dir)
    assert record["epoch"] == "2" and record["metric"] == "nats_per_image" and record["weights"] == "ema"
    again = train_run(out=tmp_path / "r", resume=True, progress=False)
    assert again.steps == r.steps and len(evaluated) == 4


def test_unknown_or_missing_weights_are_one_line_errors(tmp_path: Path) -> None:
    r = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=2, eval_limit=0), out=tmp_path / "r",
                  progress=False)
    with pytest.raises(ckpt.CheckpointError, match="not trained with --ema"):
        load_run(r.run_dir, weights="ema")
    with pytest.raises(ckpt.CheckpointError, match="unknown weights 'newest'"):
        load_run(r.run_dir, weights="newest")
    (r.run_dir / ckpt.BEST_WEIGHTS_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no held-out evaluation"):
        load_run(r.run_dir, weights="best")


@pytest.mark.slow  # torch.compile takes 10-20 s here
def test_a_compiled_run_learns_like_the_eager_one_and_resumes_exactly(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile: the same losses as eager training to float rounding, and a resumed compiled run repeats the
    uninterrupted compiled run exactly."""
    eager = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=6), out=tmp_path / "eager", progress=False)
    full = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=6, compile=True), out=tmp_path / "full",
                     progress=False)
    a, b = losses(eager.run_dir), losses(full.run_dir)
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-4)
    original = Trainer.batch

    def dying_batch(self: Trainer, step: int):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=6, compile=True), out=tmp_path / "cut",
                  progress=False)
    monkeypatch.setattr(Trainer, "batch", original)
    cut = train_run(out=tmp_path / "cut", resume=True, progress=False)
    assert losses(cut.run_dir) == losses(full.run_dir)
    assert json.loads((full.run_dir / "config.json").read_text())["train"]["compile"] is True


def test_gen_eval_scores_the_weights_asked_for(tmp_path: Path) -> None:
    """gen-eval RUN --weights ema|best scores those weights: what the run's own last evaluation reported."""
    from click.testing import CliRunner

    from genforge.cli.main import eval_command

    r = train_run(model_overrides=TINY_MODEL, train=tiny_train(steps=4, ema=0.5, eval_limit=0), out=tmp_path / "r",
                  progress=False)
    out = {}
    for w in ("last", "ema", "best"):
        res = CliRunner().invoke(eval_command, [str(r.run_dir), "--split", "valid", "--weights", w, "--quiet"])
        assert res.exit_code == 0, res.output
        out[w] = json.loads(res.output)["nats_per_image"]
    assert out["ema"] == pytest.approx(r.metrics["nats_per_image"], rel=1e-6) and out["ema"] != out["last"]
    assert out["best"] == pytest.approx(out["ema"], rel=1e-12)  # one evaluation: the best is the last average

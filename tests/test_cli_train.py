"""gen-train through click's CliRunner: the real command, tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from genforge.cli.main import train_command

TINY = ["--set", "hidden=4", "--set", "layers=1", "--set", "output_hidden=4", "--samples", "4", "--quiet"]


def test_gen_train_writes_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(train_command, [*TINY, "--steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "run:" in res.output and (out / "model.safetensors").exists()
    assert (out / "samples" / "epoch_001.png").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_config"]["hidden"] == 4 and cfg["train"]["steps"] == 3


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"model": "gated-pixelcnn", "steps": 2, "lr": 0.01,
                                "model_config": {"hidden": 3, "layers": 0}}))
    out = tmp_path / "run"
    res = CliRunner().invoke(train_command, ["--config", str(conf), "--lr", "0.002", "--samples", "0", "--quiet",
                                             "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "gated-pixelcnn" and cfg["model_config"]["hidden"] == 3
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["steps"] == 2


def test_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--data", "mnist"], "pass --data-path"),
        (["--data", "binarized-mnist", "--data-path", str(tmp_path / "nope.npz")], "no such file"),
        (["--set", "widht=3"], "unknown field(s) widht"),
        (["--resume", "--out", str(tmp_path / "empty")], "not a run directory"),
    ]
    for args, message in cases:
        res = runner.invoke(train_command, [*args, "--quiet"])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(train_command, ["--model", "transformer"])
    assert res.exit_code == 2 and "transformer" in res.output
    (tmp_path / "x.json").write_text("[1, 2]")
    res = runner.invoke(train_command, ["--config", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "expected a JSON object" in res.output

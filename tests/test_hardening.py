"""Faults and bad input: SIGKILLed training resumes to the uninterrupted result, file readers fail cleanly on
arbitrary bytes, gen-eval agrees between a run and its bundle."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genforge.cli.main import eval_command
from genforge.export import export_run
from genforge.runtime import BundleError, read_bundle
from genforge.train import CheckpointError, DataError, DataSpec, TrainConfig, train_run
from genforge.train import checkpoint as ckpt
from genforge.train.data import read_amat, read_cifar_batch, read_idx, read_image

TRAIN = [sys.executable, "-m", "genforge.cli", "train"]
STEPS = 60
ARGS = ["--set", "hidden=8", "--set", "layers=1", "--set", "output_hidden=8", "--steps", str(STEPS), "--batch-size",
        "16", "--checkpoint-every", "3", "--log-every", "1", "--samples", "0", "--eval-limit", "8", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(json.loads(x).get("step", 0)) for x in lines if x.endswith("}")]  # a line may be half written
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Kill at a random step (not after a random wall-clock delay, which a fast machine outruns), plus a
    random fraction of a step, so kills land in steps, in evaluations and in checkpoint writes."""
    full = tmp_path / "full"
    subprocess.run([*TRAIN, *ARGS, "--out", str(full)], check=True, env=_env(), timeout=300)
    cut = tmp_path / "cut"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        resume = ["--resume"] if (cut / "config.json").exists() else []
        # Resume truncates metrics to its checkpoint, so the target counts from what the file shows now.
        target = rng.randint(min(_last_step(cut) + 1, STEPS - 20), STEPS - 20)
        proc = subprocess.Popen([*TRAIN, *ARGS, "--out", str(cut), *resume], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while proc.poll() is None and _last_step(cut) < target and time.monotonic() - t0 < 120:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Whatever the moment, every checkpoint file present is whole.
        if (cut / ckpt.STATE_FILE).exists():
            ckpt.load_state(cut / ckpt.STATE_FILE)
        if (cut / ckpt.WEIGHTS_FILE).exists():
            ckpt.load_run(cut)
    assert kills >= 1, f"no run was killed (seed {seed})"
    resume = ["--resume"] if (cut / "config.json").exists() else []
    subprocess.run([*TRAIN, *ARGS, "--out", str(cut), *resume], check=True, env=_env(), timeout=300)
    # Tensor by tensor (safetensors writes its metadata map in no fixed order, so the bytes can differ).
    from safetensors.numpy import load_file

    a, b = load_file(str(full / ckpt.WEIGHTS_FILE)), load_file(str(cut / ckpt.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f"seed {seed}"
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (full / "metrics.jsonl").read_text().splitlines()], f"seed {seed}"


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(raw=st.binary(max_size=300), gz=st.booleans(), header=st.booleans(),
       dims=st.lists(st.integers(0, 6), min_size=1, max_size=4), valid=st.booleans())
def test_idx_reader_reads_what_the_header_says_or_fails_cleanly(tmp_path: Path, raw: bytes, gz: bool, header: bool,
                                                                dims: list[int], valid: bool) -> None:
    import gzip
    import struct

    if valid:  # a well-formed file: the reader must return exactly its contents
        count = int(np.prod(dims))
        data = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + ((raw or b"\x07") * count)[:count]
    else:
        data = (b"\x00\x00\x08\x03" + raw) if header else raw
    f = tmp_path / "x-idx3-ubyte"
    f.write_bytes(gzip.compress(data) if gz else data)
    try:
        arr = read_idx(f)
    except DataError:
        assert not valid, "a well-formed IDX file was refused"
        return
    # Success: exactly what an independent parse of the bytes says (the header's dims, the bytes after it).
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    assert arr.dtype == np.uint8 and arr.shape == shape and arr.tobytes() == data[4 + 4 * ndim :]


@FUZZ
@given(text=st.text(alphabet="01 \n\t.x", max_size=2000), images=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_amat_reader_reads_the_pixels_or_fails_cleanly(tmp_path: Path, text: str, images: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 2, (images, 784))
    if images:  # a well-formed file, with the fuzzed text as a prefix when it is blank
        text = ("" if text.strip() else text) + "\n".join(" ".join(map(str, row)) for row in pixels) + "\n"
    f = tmp_path / "b.amat"
    f.write_text(text)
    try:
        arr = read_amat(f)
    except DataError:
        assert not images, "a well-formed .amat file was refused"
        return
    rows = [line.split() for line in text.splitlines() if line.strip()]
    assert arr.dtype == np.uint8 and arr.shape == (len(rows), 28, 28)
    assert arr.reshape(len(rows), 784).tolist() == [[int(v) for v in row] for row in rows]


@FUZZ
@given(raw=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x80\x02}q\x00(", b"\x80\x04\x95"]),
       n=st.integers(0, 3), seed=st.integers(0, 2**31), dtype=st.sampled_from(["uint8", "int64", "float32"]))
def test_cifar_reader_reads_the_batch_or_fails_cleanly(tmp_path: Path, raw: bytes, prefix: bytes, n: int, seed: int,
                                                       dtype: str) -> None:
    import pickle

    rng = np.random.default_rng(seed)
    f = tmp_path / "data_batch_1"
    pixels = rng.integers(0, 300 if dtype != "uint8" else 256, (n, 3072)).astype(dtype)
    labels = rng.integers(0, 10, n).tolist()
    well_formed = n > 0 and dtype == "uint8"
    if n:
        f.write_bytes(pickle.dumps({b"data": pixels, b"labels": labels}, protocol=2))
    else:
        f.write_bytes(prefix + raw)
    try:
        images, got_labels = read_cifar_batch(f)
    except DataError:
        assert not well_formed, "a well-formed CIFAR-10 batch was refused"
        return
    assert n and dtype == "uint8", "a batch of non-uint8 pixels was read (a cast would wrap them)"
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.transpose(0, 3, 1, 2).reshape(n, 3072), pixels)
    assert got_labels.tolist() == labels


@FUZZ
@given(raw=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
       real=st.booleans(), seed=st.integers(0, 2**31))
def test_image_reader_reads_the_pixels_or_fails_cleanly(tmp_path: Path, raw: bytes, prefix: bytes, real: bool,
                                                        seed: int) -> None:
    from PIL import Image

    f = tmp_path / "i.png"
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    if real:
        Image.fromarray(pixels).save(f)
    else:
        f.write_bytes(prefix + raw)
    try:
        arr = read_image(f, 8, 1)
    except DataError:
        assert not real, "a well-formed PNG was refused"
        return
    assert arr.shape == (8, 8, 1) and arr.dtype == np.uint8
    if real:  # same size: no resampling, the pixels themselves
        np.testing.assert_array_equal(arr[..., 0], pixels)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hard")
    run = train_run(model_overrides={"hidden": 6, "layers": 1, "output_hidden": 6}, data=DataSpec(levels=4),
                    train=TrainConfig(steps=6, n_samples=0, eval_limit=8), out=root / "run", progress=False).run_dir
    return run, export_run(run, root / "bundle", formats=("onnx",))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_manifest_and_checkpoint_readers_fail_cleanly(small_run, data: st.DataObject) -> None:
    run, bundle = small_run
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = Path(shutil.copytree(bundle, tmp / "b"))
        r = Path(shutil.copytree(run, tmp / "r"))
        target = data.draw(st.sampled_from([b / "manifest.json", r / ckpt.STATE_FILE, r / ckpt.WEIGHTS_FILE,
                                            r / ckpt.CONFIG_FILE]))
        original = target.read_bytes()
        mode = data.draw(st.sampled_from(["random", "truncate", "flip"]))
        if mode == "random":
            target.write_bytes(data.draw(st.binary(max_size=500)))
        elif mode == "truncate":
            target.write_bytes(original[: data.draw(st.integers(0, max(0, len(original) - 1)))])
        else:
            pos = data.draw(st.integers(0, len(original) - 1))
            target.write_bytes(original[:pos] + bytes([original[pos] ^ 0xFF]) + original[pos + 1 :])
        try:
            manifest = read_bundle(b).manifest
            state = ckpt.load_state(r / ckpt.STATE_FILE)
            model, config = ckpt.load_run(r)
        except (BundleError, CheckpointError):
            return
        # Every read succeeded: then it must have read what was written, not a silently different thing
        # (a flipped byte inside a tensor is what safetensors and torch.load let through on their own).
        assert manifest == json.loads((bundle / "manifest.json").read_text())
        assert ckpt.digest(state) == ckpt.digest(ckpt.load_state(run / ckpt.STATE_FILE))
        reference, ref_config = ckpt.load_run(run)
        assert config == ref_config
        for k, v in reference.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_gen_eval_agrees_between_run_and_bundle(small_run) -> None:
    run, bundle = small_run
    outs = []
    for path in (run, bundle):
        res = CliRunner().invoke(eval_command, [str(path), "--split", "valid", "--quiet", "--levels", "4"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(res.output))
    assert outs[0]["kind"] == "run" and outs[1]["kind"] == "bundle"
    assert outs[0]["nats_per_image"] == pytest.approx(outs[1]["nats_per_image"], rel=1e-6)
    assert outs[0]["bits_per_dim"] == pytest.approx(outs[1]["bits_per_dim"], rel=1e-6)


def test_gen_eval_vae_and_gan_agree_between_run_and_bundle(tmp_path: Path) -> None:
    for model in ("vae", "gan"):
        run = train_run(model=model, model_overrides={"latent_size": 4, "hidden": 8},
                        train=TrainConfig(steps=8, batch_size=32, lr=1e-3, n_samples=0, eval_limit=8),
                        out=tmp_path / model, progress=False).run_dir
        bundle = export_run(run, tmp_path / f"{model}-b")
        extra = ["--iw-samples", "3"] if model == "vae" else ["--quality", "--quality-samples", "40"]
        outs = []
        for path in (run, bundle):
            res = CliRunner().invoke(eval_command, [str(path), "--split", "valid", "--limit", "40", "--quiet", *extra])
            assert res.exit_code == 0, res.output
            outs.append(json.loads(res.output))
        keys = ["neg_elbo", "iwae_nll", "kl_nats"] if model == "vae" else ["fd", "kd"]
        for k in keys:
            assert outs[0][k] == pytest.approx(outs[1][k], rel=1e-5), k
        if model == "vae":
            assert outs[0]["iwae_nll"] <= outs[0]["neg_elbo"] + 1.0


def test_gen_eval_errors(small_run, tmp_path: Path) -> None:
    r = CliRunner()
    res = r.invoke(eval_command, [str(tmp_path), "--quiet"])
    assert res.exit_code == 1 and "neither a run directory" in res.output
    np.savez(tmp_path / "b.npz", test=np.zeros((4, 28, 28), np.uint8))
    run, _ = small_run
    res = r.invoke(eval_command, [str(run), "--data", "binarized-mnist", "--data-path", str(tmp_path / "b.npz"),
                                  "--quiet"])
    assert res.exit_code == 1 and "cannot quantize data with 2 levels" in res.output

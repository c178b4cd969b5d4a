"""The Node.js and C++ clients in examples/ sample bundles exported in this test run: the same images as
genforge.runtime for the same seed, and log-probabilities within the float policy (issue 15, item 5).

They need node with examples/node's packages (npm ci --ignore-scripts) and g++ with nlohmann-json's headers;
.ci/run installs both and sets GENFORGE_REQUIRE_CLIENTS=1, so in CI a missing tool fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import AUTOREGRESSIVE
from helpers import edited_bundle, unavailable

from genforge.runtime import load

pytestmark = pytest.mark.slow  # builds and runs the Node and C++ clients

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
CPP_DIR = ROOT / "examples" / "cpp"


@pytest.fixture(scope="session")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        unavailable("node is not installed")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        unavailable("examples/node has no node_modules (cd examples/node && npm ci --ignore-scripts)")
    return str(exe)


@pytest.fixture(scope="session")
def cpp_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("g++") is None:
        unavailable("g++ is not installed")
    if not Path("/usr/include/nlohmann/json.hpp").is_file():
        unavailable("nlohmann-json's headers are missing (apt-get install nlohmann-json3-dev)")
    out = tmp_path_factory.mktemp("cpp") / "sample"
    t = time.perf_counter()
    r = subprocess.run(["bash", str(CPP_DIR / "build.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"C++ client compiled in {time.perf_counter() - t:.1f} s")
    return out


def _result(path: Path) -> tuple[np.ndarray, np.ndarray]:
    r = json.loads(path.read_text())
    return np.array(r["images"], dtype=np.uint8).reshape(r["shape"]), np.array(r["log_prob"])


def _check(images: np.ndarray, log_prob: np.ndarray, bundle: Path, backend: str, n: int, seed: int,
           start: int) -> None:
    sampler = load(bundle, backend=backend, device="cpu")
    want = sampler.sample(n, seed=seed, start=start)
    np.testing.assert_array_equal(images, want)
    # Image i's label is (start + i) mod classes, in the sample and in the score.
    labels = (start + np.arange(n)) % sampler.num_classes if sampler.num_classes else None
    ref = sampler.log_prob(want, labels=labels)
    assert np.max(np.abs(log_prob - ref) / (1 + np.abs(ref) / 50)) <= 1e-4, (log_prob, ref)


def test_node_reproduces_the_randomness_test_vectors(node: str) -> None:
    r = subprocess.run([node, "check_vectors.mjs", str(ROOT / "runtime" / "randomness_vectors.json")],
                       cwd=NODE_DIR, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["failures"] == 0


@pytest.mark.parametrize("name", AUTOREGRESSIVE)
@pytest.mark.parametrize("decoder", ["graph", "steps"])
def test_node_samples_what_the_runtime_samples(node: str, family_bundles, name: str, decoder: str,
                                               fresh_seed: int, tmp_path: Path) -> None:
    seed, start, n = fresh_seed, fresh_seed % 1000, 3
    out = tmp_path / "r.json"
    r = subprocess.run([node, "sample.mjs", str(family_bundles[name]), "--n", str(n), "--seed", str(seed),
                        "--start", str(start), "--decoder", decoder, "--out", str(out)],
                       cwd=NODE_DIR, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check(*_result(out), family_bundles[name], "onnx", n, seed, start)


@pytest.mark.parametrize("name", AUTOREGRESSIVE)
def test_cpp_samples_what_the_runtime_samples(cpp_client: Path, family_bundles, name: str, fresh_seed: int,
                                              tmp_path: Path) -> None:
    seed, start, n = fresh_seed, fresh_seed % 1000, 3
    out = tmp_path / "r.json"
    r = subprocess.run([str(cpp_client), str(family_bundles[name]), "--n", str(n), "--seed", str(seed),
                        "--start", str(start), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check(*_result(out), family_bundles[name], "torchscript", n, seed, start)


def test_clients_refuse_a_bundle_they_cannot_read(node: str, cpp_client: Path, family_bundles, tmp_path: Path) -> None:
    """A newer format version is refused with one line and a non-zero exit, not sampled wrongly."""
    copy = edited_bundle(family_bundles["pixelcnn"], tmp_path / "b", lambda m: m.update(version=99))
    for cmd in ([node, str(NODE_DIR / "sample.mjs"), str(copy)], [str(cpp_client), str(copy)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 1 and "version 99" in r.stderr and r.stderr.count("\n") == 1, (cmd, r.stderr)

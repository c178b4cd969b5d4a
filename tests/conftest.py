import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels run under the interpreter on the CPU, unless a GPU session asks for the real thing
# (GENFORGE_TEST_DEVICE=cuda python -m pytest tests/test_triton.py).
if os.environ.get("GENFORGE_TEST_DEVICE") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


@pytest.fixture
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A seed for fresh random inputs each run; a failing test's report names it, and GENFORGE_TEST_SEED=N
    reruns with it."""
    forced = os.environ.get("GENFORGE_TEST_SEED")
    seed = int(forced) if forced else int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("fresh_seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "fresh_seed":
                report.sections.append(("fresh inputs", f"seed {value}: rerun with GENFORGE_TEST_SEED={value}"))


FAMILY_MODELS = ("pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm", "pixelcnn-rgb", "vae", "gan")
AUTOREGRESSIVE = ("pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm", "pixelcnn-rgb")


# The families the fast suite exports; a test that needs another family's bundle (its parameters name one) is
# marked slow here, as are tests marked by hand for reading every family.
FAST_FAMILIES = ("pixelcnn", "gated-pixelcnn")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not {"family_bundles", "family_runs"} & set(getattr(item, "fixturenames", ())):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if {v for v in params.values() if isinstance(v, str) and v in FAMILY_MODELS} - set(FAST_FAMILIES):
            item.add_marker(pytest.mark.slow)


class _Families(Mapping):
    """name -> what ``build(name)`` returns, built on first access and kept: a test that needs one family's
    bundle pays for that export alone (about 15 s), not for all seven (2-3 minutes)."""

    def __init__(self, build: Callable[[str], Any]) -> None:
        self._build, self._built = build, {}

    def __getitem__(self, name: str) -> Any:
        if name not in FAMILY_MODELS:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILY_MODELS)

    def __len__(self) -> int:
        return len(FAMILY_MODELS)


@pytest.fixture(scope="session")
def family_bundles(family_runs: Mapping[str, tuple[Path, Path]]) -> Mapping[str, Path]:
    """A bundle (ONNX and TorchScript) of each kind of graph set: PixelCNN; gated, conditional (its ONNX row
    drops caches); Row LSTM; Diagonal BiLSTM; a colour PixelCNN with a logistic-mixture head; VAE; GAN.
    Exported on first use (``_Families``)."""
    return _Families(lambda name: family_runs[name][1])


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, tuple[Path, Path]]:
    """(run directory, bundle) of family_bundles' models, 8x8 with 4 levels but the colour one; each exported
    once per session, when a test first asks for it. Tests must not change these directories."""
    import numpy as np
    from PIL import Image

    from genforge.export import export_run
    from genforge.train import DataSpec, TrainConfig, train_run

    root = tmp_path_factory.mktemp("families")
    tiny = {"hidden": 6, "layers": 1, "output_hidden": 6}
    small = {"pixelcnn": tiny, "gated-pixelcnn": tiny, "row-lstm": {"hidden": 4, "layers": 1, "output_hidden": 4},
             "diagonal-bilstm": {"hidden": 4, "layers": 1, "output_hidden": 4},
             "pixelcnn-rgb": {**tiny, "likelihood": "logistic-mixture"},
             "vae": {"latent_size": 4, "hidden": 8, "depth": 1}, "gan": {"latent_size": 4, "hidden": 8}}

    def build(name: str) -> tuple[Path, Path]:
        if name == "pixelcnn-rgb":
            rng = np.random.default_rng(0)
            (root / "rgb").mkdir()
            for i in range(24):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / "rgb" / f"{i}.png")
        data = (DataSpec("folder", path=str(root / "rgb"), image_size=6, levels=8) if name == "pixelcnn-rgb"
                else DataSpec(levels=4, conditional=name == "gated-pixelcnn"))
        run = train_run(model=name.removesuffix("-rgb"), data=data, model_overrides=small[name], out=root / name,
                        progress=False, train=TrainConfig(steps=1, batch_size=16, n_samples=0, eval_limit=8))
        return run.run_dir, export_run(run.run_dir, root / f"{name}-bundle", formats=("onnx", "torchscript"))

    return _Families(build)

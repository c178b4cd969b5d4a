import os
import sys
from pathlib import Path

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

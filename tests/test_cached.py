"""Cached decoding is exact: same images as naive decoding for the same uniforms, in float64, for every
model, head, depth, width and channel count; its per-step log-probabilities equal the full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genforge.models import MODELS as REGISTRY
from genforge.models import build_model
from genforge.models.incremental import EagerStepper
from genforge.runtime.decoding import cached_decode, naive_decode
from genforge.runtime.randomness import uniforms


class RecordingStepper(EagerStepper):
    """Keeps what each step returned for the sub-pixel being sampled, in generation order."""

    def reset(self, batch, labels=None):  # type: ignore[no-untyped-def]
        super().reset(batch, labels)
        self.log = []

    def step(self, x_row, j):  # type: ignore[no-untyped-def]
        lp = super().step(x_row, j)
        self.log.append(lp)
        return lp


def float64_forward(model):  # type: ignore[no-untyped-def]
    def forward(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            lab = None if labels is None else torch.from_numpy(labels)
            return model(torch.from_numpy(x).double(), lab).numpy()

    return forward


def check_exact(model, batch: int = 3, seed: int = 0, rows: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Cached and naive decoding agree; every cached log-probability equals the full forward pass's."""
    model = model.double().eval()
    c = model.config
    labels = np.arange(batch) % c.num_classes if c.num_classes else None
    u = uniforms(seed, 0, batch, (c.height, c.width, c.channels))
    prefix = None
    if rows:
        prefix = np.random.default_rng(seed).integers(0, c.levels, (batch, c.height, c.width, c.channels))
        prefix = prefix.astype(np.uint8)
    stepper = RecordingStepper(model.cached_form(), torch.float64)
    cached = cached_decode(stepper, u, labels=labels, levels=c.levels, prefix=prefix, start_row=rows)
    naive = naive_decode(float64_forward(model), u, labels=labels, levels=c.levels, prefix=prefix, start_row=rows)
    np.testing.assert_array_equal(cached, naive)
    if rows:
        np.testing.assert_array_equal(cached[:, :rows], prefix[:, :rows])
    # The log-probabilities each step produced, against one full forward pass over the finished images.
    full = float64_forward(model)(cached.transpose(0, 3, 1, 2).astype(np.float32), labels)  # (B, C, H, W, K)
    calls = iter(stepper.log)
    for i in range(c.height):
        for j in range(c.width):
            if i < rows:
                next(calls)
                continue
            for k in range(c.channels):
                lp = next(calls)
                np.testing.assert_allclose(lp[:, k], full[:, k, i, j], rtol=0, atol=1e-10)


# Every registered autoregressive model: a new family's cached form is checked without editing this file.
MODELS = [name for name, spec in REGISTRY.items() if spec.family == "autoregressive"]
HEADS = [("bernoulli", 2), ("categorical", 5), ("logistic-mixture", 9)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,levels", HEADS)
@pytest.mark.parametrize("channels", [1, 3])
def test_cached_equals_naive_for_every_head(name: str, likelihood: str, levels: int, channels: int) -> None:
    torch.manual_seed(0)
    check_exact(build_model(name, tiny_config(channels, 4, 5, levels, likelihood)))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layers,hidden,kernel", [(1, 3, 3), (1, 6, 5), (4, 9, 3)])
def test_cached_equals_naive_across_depths_and_widths(name: str, layers: int, hidden: int, kernel: int) -> None:
    torch.manual_seed(1)
    cfg = tiny_config(3, 5, 4, 4, layers=layers, hidden=hidden, kernel=kernel, first_kernel=kernel + 2,
                      output_hidden=5, num_classes=3)
    check_exact(build_model(name, cfg))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rows", [1, 3])
def test_completion_agrees(name: str, rows: int) -> None:
    torch.manual_seed(2)
    check_exact(build_model(name, tiny_config(3, 4, 4, 4)), rows=rows)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(MODELS),
    channels=st.sampled_from([1, 3]),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    layers=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=st.sampled_from([1, 3, 5]),
    first_kernel=st.sampled_from([3, 5, 7]),
    head=st.sampled_from(HEADS),
    classes=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_cached_equals_naive_property(name, channels, height, width, layers, groups, kernel, first_kernel, head,
                                      classes, seed) -> None:  # type: ignore[no-untyped-def]
    likelihood, levels = head
    torch.manual_seed(seed)
    cfg = tiny_config(channels, height, width, levels, likelihood, layers=layers, hidden=3 * groups, kernel=kernel,
                      first_kernel=first_kernel, output_hidden=4, num_classes=classes)
    check_exact(build_model(name, cfg), batch=2, seed=seed)


def test_cache_memory_is_rows_times_width() -> None:
    """O(layers x kernel height x width x channels): no cache holds a whole image."""
    cfg = tiny_config(1, 28, 28, 2, "bernoulli", layers=3, hidden=12)
    for name in MODELS:
        inc = build_model(name, cfg).cached_form()
        for cache_name, shape in inc.cache_specs():
            assert np.prod(shape) <= 12 * 2 * 4 * (28 + 6), (name, cache_name, shape)

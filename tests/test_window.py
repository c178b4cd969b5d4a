"""Windowed parallel decoding: the ``window`` form of the cached models (PixelCNN, Gated PixelCNN) equals the
full forward pass on its rows and hands back exactly the caches ``row`` leaves; the windowed iteration reaches
the naive fixed point on random causal models; on exported bundles it draws the cached decoder's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from genforge.models import build_model
from genforge.models.incremental import EagerStepper
from genforge.runtime import load
from genforge.runtime.decoding import cached_decode, naive_decode, window_decode

WINDOWED = [("pixelcnn", 1, "categorical", 0), ("pixelcnn", 3, "logistic-mixture", 0),
            ("gated-pixelcnn", 1, "categorical", 4), ("gated-pixelcnn", 3, "categorical", 0)]


def tiny_model(family: str, channels: int, likelihood: str, classes: int, seed: int, height: int = 6):
    torch.manual_seed(seed)
    cfg = tiny_config(channels=channels, height=height, width=5, levels=4, likelihood=likelihood,
                      num_classes=classes)
    return build_model(family, cfg).double().eval()


def caches_at(inc, x: torch.Tensor, row: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """The caches as ``row`` leaves them at ``row``, by the cached form's own row/step calls."""
    b, _, _, w = x.shape
    caches = inc.init_caches(b, torch.float64)
    for i in range(row + 1):
        prev = x[:, :, i - 1] if i else torch.zeros_like(x[:, :, 0])
        caches = inc.row(prev, torch.tensor([1.0 if i else 0.0], dtype=torch.float64), caches, labels)
        if i < row:
            for j in range(w):
                _, caches = inc.step(x[:, :, i].clone(), torch.tensor([j]), caches, labels)
    return caches


@pytest.mark.parametrize(("family", "channels", "likelihood", "classes"), WINDOWED)
def test_window_equals_forward_and_leaves_the_row_caches(family, channels, likelihood, classes, fresh_seed) -> None:
    model = tiny_model(family, channels, likelihood, classes, fresh_seed)
    inc = model.cached_form().double().eval()
    rng = np.random.default_rng(fresh_seed)
    c = model.config
    x = torch.from_numpy(rng.integers(0, c.levels, (3, channels, c.height, c.width))).double()
    labels = torch.from_numpy(rng.integers(0, classes, 3)) if classes else None
    with torch.no_grad():
        full = model(x, labels)
        caches = caches_at(inc, x, 0, labels)
        top, calls = 0, 0
        while top < c.height - 1:
            k = int(rng.integers(1, c.height - top + 1))
            advance = int(rng.integers(0, k))
            lp, caches = inc.window(x[:, :, top : top + k], torch.tensor([advance]), caches, labels)
            torch.testing.assert_close(lp, full[:, :, top : top + k], rtol=0, atol=1e-10)
            top += advance
            for got, want in zip(caches, caches_at(inc, x, top, labels), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
            calls += 1
        assert calls >= 1


def test_a_wrong_cache_changes_the_window(fresh_seed) -> None:
    """The check above could fail: the window really reads the rows above from its caches."""
    model = tiny_model("gated-pixelcnn", 1, "categorical", 0, fresh_seed)
    inc = model.cached_form().double().eval()
    x = torch.randint(0, 4, (2, 1, 6, 5)).double()
    with torch.no_grad():
        caches = caches_at(inc, x, 2, None)
        good, _ = inc.window(x[:, :, 2:5], torch.tensor([1]), caches, None)
        bad, _ = inc.window(x[:, :, 2:5], torch.tensor([1]), [cc + 0.5 for cc in caches], None)
        assert torch.allclose(good, model(x)[:, :, 2:5]) and not torch.allclose(good, bad)


def eager_window(inc):  # type: ignore[no-untyped-def]
    def window(x_rows, advance, caches, labels):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            lab = None if labels is None else torch.from_numpy(labels)
            lp, new = inc.window(torch.from_numpy(x_rows).double(), torch.tensor([advance]), caches, lab)
        return lp.numpy(), new

    return window


@pytest.mark.parametrize(("family", "channels", "likelihood", "classes"), WINDOWED)
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_window_decoding_draws_the_cached_images(family, channels, likelihood, classes, rows, fresh_seed) -> None:
    model = tiny_model(family, channels, likelihood, classes, fresh_seed)
    inc = model.cached_form().double().eval()
    rng = np.random.default_rng(fresh_seed)
    c = model.config
    u = rng.random((4, c.height, c.width, channels))
    labels = rng.integers(0, classes, 4) if classes else None
    prefix = rng.integers(0, c.levels, (4, c.height, c.width, channels)).astype(np.uint8)
    stepper = EagerStepper(model.cached_form(), torch.float64)
    for start_row in (0, 2):
        with torch.no_grad():
            start = caches_at(inc, torch.zeros(4, channels, c.height, c.width, dtype=torch.float64), 0,
                              None if labels is None else torch.from_numpy(labels))
        stats: dict = {}
        got = window_decode(eager_window(inc), start, u, labels=labels, levels=c.levels, prefix=prefix,
                            start_row=start_row, depth=rows, stats=stats)
        want = cached_decode(stepper, u, labels=labels, levels=c.levels, prefix=prefix, start_row=start_row)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[:, :start_row], prefix[:, :start_row])
        assert 1 <= stats["passes"] <= (c.height - start_row) * c.width * channels


def causal_window(h: int, w: int, c: int, k: int, seed: int, strength: float):  # type: ignore[no-untyped-def]
    """A random causal model (logits at raster position p linear in the levels before p) as a window graph
    whose one cache is the image rows above the window, and the window's own forward as a plain function."""
    n = h * w * c
    rng = np.random.default_rng(seed)
    weights = np.tril(rng.normal(0, strength, (n, n, k)).transpose(2, 0, 1), k=-1).transpose(1, 2, 0)
    bias = rng.normal(0, 1, (n, k))

    def forward(x: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        flat = x.transpose(0, 2, 3, 1).reshape(len(x), n)
        logits = np.einsum("bq,pqk->bpk", flat, weights) + bias
        logits = logits - logits.max(-1, keepdims=True)
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return lp.reshape(len(x), h, w, c, k).transpose(0, 3, 1, 2, 4)

    def window(x_rows: np.ndarray, advance: int, caches: list, labels: np.ndarray | None):  # type: ignore[no-untyped-def]
        (above,) = caches  # (B, C, top, W)
        top, r = above.shape[2], x_rows.shape[2]
        assert 0 <= advance < r and top + r <= h
        # Rows below the window hold garbage: a causal window never reads them.
        below = rng.integers(0, k, (len(x_rows), c, h - top - r, w)).astype(x_rows.dtype)
        lp = forward(np.concatenate([above, x_rows, below], axis=2), labels)[:, :, top : top + r]
        return lp, [np.concatenate([above, x_rows[:, :, :advance]], axis=2)]

    return forward, window


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 4), c=st.sampled_from([1, 3]), k=st.integers(2, 5),
       batch=st.integers(1, 4), seed=st.integers(0, 2**31), strength=st.sampled_from([0.1, 1.0, 5.0]),
       start_row=st.integers(0, 5), rows=st.integers(1, 4), grow=st.booleans())
def test_window_decoding_reaches_the_naive_fixed_point(h, w, c, k, batch, seed, strength, start_row, rows,
                                                       grow) -> None:
    start_row = min(start_row, h)
    forward, window = causal_window(h, w, c, k, seed, strength)
    rng = np.random.default_rng(seed + 1)
    u = rng.random((batch, h, w, c))
    prefix = rng.integers(0, k, (batch, h, w, c)).astype(np.uint8)
    stats: dict = {}
    got = window_decode(window, [np.zeros((batch, c, 0, w))], u, levels=k, prefix=prefix, start_row=start_row,
                        depth=rows, grow=grow, stats=stats)
    np.testing.assert_array_equal(got, naive_decode(forward, u, levels=k, prefix=prefix, start_row=start_row))
    assert stats["passes"] <= max(1, (h - start_row) * w * c)


@pytest.mark.parametrize("name", ["pixelcnn", "gated-pixelcnn", "pixelcnn-rgb"])
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_bundles_decode_in_parallel_through_their_window_graph(family_bundles, name, backend, fresh_seed) -> None:
    s = load(family_bundles[name], backend=backend, device="cpu")
    assert s.bundle.manifest["graphs"][f"window.{backend}"]["role"] == "window"
    want = s.sample(4, seed=fresh_seed, decoder="cached", batch_size=3)
    got = s.sample(4, seed=fresh_seed, decoder="parallel", batch_size=3)
    np.testing.assert_array_equal(got, want)
    assert s.last_stats["method"] == "window"
    h = s.image_shape[0]
    # A pass computes a window of rows, not the image: fewer image-forward equivalents than passes.
    assert s.last_stats["forward_passes"] / 4 < max(s.last_stats["passes"])
    np.testing.assert_array_equal(s.complete(want, h // 2, seed=fresh_seed + 1, decoder="parallel"),
                                  s.complete(want, h // 2, seed=fresh_seed + 1, decoder="cached"))


@pytest.mark.slow
def test_gen_sample_says_which_parallel_decoding_ran(family_bundles, tmp_path) -> None:
    from click.testing import CliRunner

    from genforge.cli.main import sample_command

    for name, through in (("pixelcnn", "window"), ("row-lstm", "forward")):
        out = tmp_path / f"{name}.npz"
        r = CliRunner().invoke(sample_command, [str(family_bundles[name]), "-n", "2", "--seed", "3",
                                                "--decoder", "parallel", "--quiet", "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert f"parallel decoding through the {through} graph" in r.output, r.output
        want = load(family_bundles[name], backend="onnx", device="cpu").sample(2, seed=3, decoder="cached")
        np.testing.assert_array_equal(np.load(out)["images"], want)


def test_gen_sample_says_what_auto_ran_and_counts_passes_over_the_parallel_batches(family_bundles, tmp_path) -> None:
    from click.testing import CliRunner

    from genforge.cli.main import sample_command
    from genforge.runtime.sampler import WINDOW_PARALLEL_MAX_BATCH

    batch = WINDOW_PARALLEL_MAX_BATCH["onnx"] + 1  # decoder="auto" times cached, then parallel, at this size
    out = tmp_path / "auto.npz"
    r = CliRunner().invoke(sample_command, [str(family_bundles["pixelcnn"]), "-n", str(2 * batch), "--batch-size",
                                            str(batch), "--backend", "onnx", "--device", "cpu", "--quiet", "--out",
                                            str(out)])
    assert r.exit_code == 0, r.output
    assert "cached+parallel decoding through the window graph" in r.output, r.output
    # The second batch ran in parallel: the equivalents are per image of that batch, as decoding it alone says.
    per_image = r.output.split("sub-pixels, ")[1].split(" forward-pass")[0]
    s = load(family_bundles["pixelcnn"], backend="onnx", device="cpu")
    np.testing.assert_array_equal(np.load(out)["images"], s.sample(2 * batch, seed=0, decoder="cached"))
    s.sample(batch, seed=0, start=batch, decoder="parallel", batch_size=batch)
    assert per_image == f"{s.last_stats['forward_passes'] / batch:.1f}", r.output

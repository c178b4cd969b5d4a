"""Model tests: causality for every model, head and channel count; shapes; save/load round trips."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import causality_violations, dependency_matrix, tiny_config

from genforge.models import MODELS, ConfigError, build_model, causal_mask, make_config
from genforge.models.heads import make_head, nll_from_log_probs

AR_MODELS = [name for name, spec in MODELS.items() if spec.family == "autoregressive"]
HEADS = [("bernoulli", 2), ("categorical", 5), ("logistic-mixture", 7)]


@pytest.mark.parametrize("name,head,channels", [
    (n, h, c) for n, h, c in itertools.product(AR_MODELS, HEADS, (1, 3))
])
def test_causality(name: str, head: tuple[str, int], channels: int) -> None:
    likelihood, levels = head
    # A fixed initialization: 4 of 400 random ones (row-lstm, logistic mixture, 3 channels) leave some output
    # with no visible dependency on any of the three inputs below, which the "depends on something" check
    # flags; the run order of the suite decided which one a test got.
    torch.manual_seed(0)
    model = build_model(name, tiny_config(channels, 4, 5, levels, likelihood, hidden=24, output_hidden=24))
    # Several random inputs: a ReLU that happens to be off for one input hides a dependency, never adds one.
    dep = dependency_matrix(model, seed=0) | dependency_matrix(model, seed=1) | dependency_matrix(model, seed=2)
    assert causality_violations(dep) == []
    # The test must be able to see dependencies at all: every output past the first depends on something,
    # and within a pixel each colour channel depends on the ones before it.
    assert dep[1:].any(dim=1).all()
    if channels == 3:
        for t in range(0, dep.shape[0], 3):
            assert dep[t + 1, t] and dep[t + 2, t] and dep[t + 2, t + 1]


@pytest.mark.parametrize("name", AR_MODELS)
def test_causality_with_labels(name: str) -> None:
    model = build_model(name, tiny_config(3, 4, 4, 4, num_classes=3))
    assert causality_violations(dependency_matrix(model, labels=torch.tensor([2]))) == []


def test_causality_check_detects_a_leak() -> None:
    """A mask-B first layer lets each sub-pixel see itself: the check must report it."""
    model = build_model("pixelcnn", tiny_config(1, 4, 4, 4))
    conv = model.input_conv
    conv.mask = causal_mask("B", conv.out_channels, conv.in_channels, conv.kernel_size)
    leaks = causality_violations(dependency_matrix(model))
    assert leaks and all(s == t for s, t in leaks)


def test_gated_pixelcnn_has_no_blind_spot() -> None:
    """The output at (i, j) sees (i-1, j+1) through the vertical stack; the original PixelCNN does not."""
    h = w = 5
    cfg = tiny_config(1, h, w, 4, layers=1)
    gated = dependency_matrix(build_model("gated-pixelcnn", cfg))
    plain = dependency_matrix(build_model("pixelcnn", {**cfg, "first_kernel": 3, "layers": 1}))
    s, t = 2 * w + 1, 1 * w + 2  # output (2, 1), input (1, 2)
    assert gated[s, t]
    # With 3x3 kernels the plain PixelCNN's (2, 1) reaches (1, 2) only through (1, 3) -> blind spot grows;
    # two 3x3 layers cannot reach (0, 4) from (2, 1): check the blind spot that [2] describes.
    assert not plain[2 * w + 1, 0 * w + 4]
    assert gated[2 * w + 1, 0 * w + 3]


@pytest.mark.parametrize("name", AR_MODELS)
@pytest.mark.parametrize("likelihood,levels", HEADS)
def test_shapes_and_normalization(name: str, likelihood: str, levels: int) -> None:
    model = build_model(name, tiny_config(3, 4, 6, levels, likelihood)).double()
    x = torch.randint(0, levels, (2, 3, 4, 6))
    lp = model(x)
    assert lp.shape == (2, 3, 4, 6, levels)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3, 4, 6, dtype=torch.float64), atol=1e-12, rtol=0)
    nll = model.nll(x)
    assert nll.shape == (2,) and (nll > 0).all()


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = build_model("pixelcnn", tiny_config(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 4, 4\)"):
        model(torch.zeros(1, 3, 4, 4))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        make_config("nope")
    with pytest.raises(ConfigError, match="unknown field"):
        make_config("pixelcnn", {"hiden": 3})
    with pytest.raises(ConfigError, match="bernoulli likelihood needs levels == 2"):
        make_config("pixelcnn", {"levels": 4, "likelihood": "bernoulli"})
    with pytest.raises(ConfigError, match="multiple of the 3 colour groups"):
        make_config("gated-pixelcnn", {"channels": 3, "hidden": 8})


def test_heads_against_direct_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    # Bernoulli: p(1) = sigmoid(logit).
    logit = torch.randn(3, 1, 1, 2, 2, generator=g, dtype=torch.float64)
    lp = make_head("bernoulli", 2).log_probs(logit)
    torch.testing.assert_close(lp[..., 1].exp(), torch.sigmoid(logit[:, 0]))
    # Logistic mixture: compare with sigmoid differences computed directly in float64.
    levels, m = 6, 3
    params = torch.randn(2, 3 * m, 1, 1, 1, generator=g, dtype=torch.float64)
    lp = make_head("logistic-mixture", levels, m).log_probs(params)[:, 0, 0, 0]  # (2, K)
    pi = torch.softmax(params[:, :m, 0, 0, 0], dim=1)
    mu, s = params[:, m : 2 * m, 0, 0, 0], params[:, 2 * m :, 0, 0, 0].clamp(min=-7).exp()
    centres = torch.linspace(-1, 1, levels, dtype=torch.float64)
    half = 1.0 / (levels - 1)
    upper = torch.sigmoid((centres[None, None, :] + half - mu[..., None]) / s[..., None])
    lower = torch.sigmoid((centres[None, None, :] - half - mu[..., None]) / s[..., None])
    upper[..., -1], lower[..., 0] = 1.0, 0.0
    expected = (pi[..., None] * (upper - lower)).sum(1)
    torch.testing.assert_close(lp.exp(), expected, atol=1e-12, rtol=1e-9)


def test_nll_picks_the_observed_level() -> None:
    lp = torch.log_softmax(torch.randn(2, 1, 2, 2, 4, dtype=torch.float64), -1)
    x = torch.randint(0, 4, (2, 1, 2, 2))
    manual = -torch.stack([sum(lp[b, 0, i, j, x[b, 0, i, j]] for i in range(2) for j in range(2)) for b in range(2)])
    torch.testing.assert_close(nll_from_log_probs(lp, x), manual)


@pytest.mark.parametrize("name", AR_MODELS)
def test_save_load_round_trip(tmp_path, name: str) -> None:
    from genforge.train.checkpoint import load_weights, save_weights

    cfg = make_config(name, tiny_config(3, 4, 4, 8, "logistic-mixture", num_classes=2))
    a = build_model(name, cfg)
    save_weights(tmp_path / "w.safetensors", a)
    b = build_model(name, make_config(name, cfg.to_dict()))
    load_weights(tmp_path / "w.safetensors", b)
    x, y = torch.randint(0, 8, (2, 3, 4, 4)), torch.tensor([0, 1])
    torch.testing.assert_close(a(x, y), b(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["pixelcnn", "gated-pixelcnn"])
def test_dropout_acts_in_training_only_and_keeps_causality(name: str) -> None:
    """dropout > 0: training passes drop features at random (two calls differ) without breaking causality (a
    mask multiplies features elementwise); in eval the model is the same function as without dropout."""
    torch.manual_seed(0)
    model = build_model(name, tiny_config(1, 4, 5, 4, "categorical", hidden=24, output_hidden=24, dropout=0.5))
    torch.manual_seed(0)
    plain = build_model(name, tiny_config(1, 4, 5, 4, "categorical", hidden=24, output_hidden=24))
    plain.load_state_dict(model.state_dict())
    x = torch.randint(0, 4, (3, 1, 4, 5))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), plain.eval()(x))
    model.train()
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(1, 1, 4, 5, generator=g, dtype=torch.float64) * 3
    model = model.double()

    def f(inp: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)  # the same dropout mask for every Jacobian row
        return model(inp.reshape(1, 1, 4, 5)).sum(-1).reshape(-1)

    dep = torch.autograd.functional.jacobian(f, xs.reshape(-1)) != 0
    assert causality_violations(dep) == []
    with pytest.raises(ConfigError, match="dropout must be in"):
        build_model(name, tiny_config(1, 4, 5, 4, "categorical", dropout=1.0))

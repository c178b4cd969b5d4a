"""Configs and the base class shared by the autoregressive models.

A model is defined by its config dataclass; the config is saved next to the weights (``config.json``) so a
model is always rebuilt from its files alone.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .graphs import GraphDef, autoregressive_graphs
from .heads import LIKELIHOODS, make_head, nll_from_log_probs
from .incremental import pointwise
from .layers import MaskedConv2d

if TYPE_CHECKING:
    from .incremental import IncrementalModel


@dataclass
class ImageConfig:
    """The image a model works on, shared by every family."""

    channels: int = 1
    height: int = 28
    width: int = 28
    levels: int = 256
    num_classes: int = 0  # 0: unconditional

    def validate(self) -> None:
        check_bounds(self)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}")
        if not 2 <= self.levels <= 256:
            raise ConfigError(f"levels must be in [2, 256], got {self.levels}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            _check_field_type(cls.__name__, key, value, hints[key])
        cfg = cls(**{k: float(v) if hints[k] is float else v for k, v in d.items()})
        cfg.validate()
        return cfg


# Integer fields any family may have, and the range each may take: far beyond what trains on one machine,
# tight enough that nothing is built (or allocated) before an absurd value is refused. Kernels are odd, so
# the masks centre on the current pixel.
FIELD_BOUNDS = {"height": (1, 1024), "width": (1, 1024), "hidden": (1, 8192), "output_hidden": (1, 8192),
                "layers": (0, 512), "depth": (0, 10), "latent_size": (1, 1 << 16), "n_mix": (1, 256),
                "num_classes": (0, 1 << 16), "kernel": (1, 63), "first_kernel": (1, 63)}
ODD_FIELDS = ("kernel", "first_kernel")


def check_bounds(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in FIELD_BOUNDS or not isinstance(value, int):
            continue
        low, high = FIELD_BOUNDS[f.name]
        if not low <= value <= high:
            raise ConfigError(f"{f.name} must be in [{low}, {high}], got {value}")
        if f.name in ODD_FIELDS and value % 2 == 0:
            raise ConfigError(f"{f.name} must be odd (the mask centres on the pixel), got {value}")


def _check_field_type(owner: str, key: str, value: Any, want: Any) -> None:
    """A config value must have its field's type: JSON's ``true`` is no layer count, ``1e3`` no width."""
    # bool is a subclass of int in Python, so it is tested first and refused for numeric fields.
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }.get(want, True)
    if not ok:
        raise ConfigError(f"{key} must be {_TYPE_NAMES.get(want, str(want))} for {owner}, got {value!r}")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p}")


def check_likelihood(likelihood: str, levels: int) -> None:
    """The checks every config with a likelihood head shares."""
    if likelihood not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
    if likelihood == "bernoulli" and levels != 2:
        raise ConfigError(f"the bernoulli likelihood needs levels == 2, got {levels}")


@dataclass
class AutoregressiveConfig(ImageConfig):
    likelihood: str = "categorical"
    n_mix: int = 5  # mixture components, for the logistic-mixture likelihood only

    def validate(self) -> None:
        super().validate()
        check_likelihood(self.likelihood, self.levels)


class GenerativeModel(nn.Module):
    """What every family shares: a validated config, and images of levels mapped to [-1, 1]."""

    family: ClassVar[str] = ""
    config: ImageConfig

    def __init__(self, config: ImageConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config

    def masked_convs(self) -> list[MaskedConv2d]:
        """Every masked convolution of the network (the Triton backend swaps in its kernel for each)."""
        return [m for m in self.modules() if isinstance(m, MaskedConv2d)]

    def export_graphs(self) -> list[GraphDef]:
        """The graphs a bundle of this model holds (models/graphs.py), each with names, shapes and a way to
        draw random inputs; the exporter exports and verifies whatever a model lists."""
        raise NotImplementedError(f"{type(self).__name__} lists no export graphs")

    def latent_prior(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the Gaussian z is drawn from to sample, for a model with a latent: N(0, I) unless
        a family fits its own (the autoencoder); None for a model without one."""
        z = getattr(self.config, "latent_size", None)
        return None if z is None else (torch.zeros(z), torch.ones(z))

    def bundle_fields(self) -> dict[str, Any]:
        """The manifest fields a sampler needs beyond the image: likelihood, latent size and prior."""
        prior = self.latent_prior()
        return {"likelihood": getattr(self.config, "likelihood", None),
                "latent_size": getattr(self.config, "latent_size", None),
                "prior": None if prior is None else {"mean": prior[0].tolist(), "std": prior[1].tolist()}}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Levels 0..K-1 -> [-1, 1], in the dtype of the model's weights."""
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * (2.0 / (self.config.levels - 1)) - 1.0

    def one_hot(self, labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """Class labels (B,) as one-hot rows in ``like``'s dtype; None for an unconditional model."""
        n = self.config.num_classes
        if not n:
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional ({n} classes): pass labels")
        return F.one_hot(labels.long(), n).to(like.dtype)


class AutoregressiveModel(GenerativeModel):
    """Base class: a network that maps an image of levels to per-sub-pixel level log-probabilities.

    Subclasses build their layers and implement ``params(x, labels)`` returning raw head parameters
    (B, P * C, H, W) laid out as (P, C) on the channel axis, so channel k's parameters sit in colour
    group k. Sub-pixels are ordered raster-wise over (row, column) and R -> G -> B within a pixel; the
    output at a sub-pixel depends only on sub-pixels strictly before it.
    """

    family: ClassVar[str] = "autoregressive"
    config: AutoregressiveConfig

    def __init__(self, config: AutoregressiveConfig) -> None:
        super().__init__(config)
        self.head = make_head(config.likelihood, config.levels, config.n_mix)
        self.label_embedding: nn.Embedding | None = None

    @property
    def out_features(self) -> int:
        return self.head.params_per_channel * self.config.channels

    # ---- the output layers every autoregressive family ends in: relu -> 1x1 -> relu -> 1x1 -> head parameters.
    # Written once here, in a full form (the forward pass) and a per-pixel form (the cached forms); the fused
    # Triton decoders read the same two layers through ``output_layers``.

    def init_output_layers(self, hidden: int, output_hidden: int) -> None:
        g = self.config.channels
        self.out1 = MaskedConv2d(hidden, output_hidden, 1, mask_type="B", groups=g)
        self.out2 = MaskedConv2d(output_hidden, self.out_features, 1, mask_type="B", groups=g)

    def output_layers(self) -> tuple[MaskedConv2d, MaskedConv2d]:
        return self.out1, self.out2

    def output_params(self, h: torch.Tensor) -> torch.Tensor:
        """Features (B, hidden, H, W) -> raw head parameters (B, P * C, H, W)."""
        return self.out2(F.relu(self.out1(F.relu(h))))

    def output_params_at(self, h: torch.Tensor) -> torch.Tensor:
        """One pixel's features (B, hidden) -> its raw head parameters (B, P * C), same weights."""
        return pointwise(self.out2, F.relu(pointwise(self.out1, F.relu(h))))

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def export_graphs(self) -> list[GraphDef]:
        return autoregressive_graphs(self)

    def cached_form(self) -> IncrementalModel:
        """The incremental (cached) form of this network, sharing its weights (models/incremental.py has
        the shared machinery). A family without one decodes naively; the exporter then writes no
        row/step graphs."""
        raise TypeError(f"{type(self).__name__} has no cached form")

    def check_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        if torch.jit.is_tracing():  # exported graphs have a symbolic batch; the exporter checks shapes itself
            return
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.channels, c.height, c.width):
            raise ValueError(
                f"expected images of shape (B, {c.channels}, {c.height}, {c.width}), got {tuple(x.shape)}"
            )
        if c.num_classes and labels is None:
            raise ValueError(f"this model is class-conditional ({c.num_classes} classes): pass labels")

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) levels (any dtype) -> log-probabilities (B, C, H, W, K)."""
        return self.grid_log_probs(self.params(x, labels))

    def grid_log_probs(self, params: torch.Tensor) -> torch.Tensor:
        """Raw head parameters (B, P * C, H', W') of any grid of pixels -> log-probabilities (B, C, H', W', K)."""
        b, _, h, w = params.shape
        if params.dtype in (torch.bfloat16, torch.float16):  # under autocast: the likelihood in float32
            params = params.float()
        return self.head.log_probs(params.reshape(b, self.head.params_per_channel, self.config.channels, h, w))

    def nll(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact negative log-likelihood per image, in nats: (B,)."""
        return nll_from_log_probs(self(x, labels), x)

    def label_bias(self, labels: torch.Tensor | None, embedding: nn.Embedding | None) -> torch.Tensor | None:
        """A per-image bias (B, F, 1, 1) from the class label, or None when unconditional."""
        if embedding is None or labels is None:
            return None
        return embedding(labels.long())[:, :, None, None]

"""The graphs a model exports, declared by the model itself (``model.export_graphs()``): a wrapper module
taking positional tensors, their names, shapes (batch dimension ``"batch"``) and dtypes, and a way to draw
random inputs for parity checks. The exporter only exports, verifies and writes; it never asks what a
model is. Shared here: the method and cached-step wrappers and the three families' graph sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .incremental import IncrementalModel

# The model classes import this module, so the functions below take them as nn.Module (duck-typed on
# ``config``, ``cached_form`` and ``variational``) rather than importing them back.


@dataclass
class GraphDef:
    """A graph to export: a module taking positional tensors named ``inputs`` and returning ``outputs``."""

    name: str
    module: nn.Module
    inputs: list[dict[str, Any]]  # {"name", "shape" (with "batch"), "dtype"}
    outputs: list[dict[str, Any]]
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    # Cached decoding: the caches this graph carries, by name; input ``cache_NAME`` of one call is output
    # ``new_NAME`` of the call before (docs/bundle.md, "Cached decoding").
    state: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the graph's manifest entry
    formats: tuple[str, ...] = ("onnx", "torchscript")  # the export formats it is written in


class MethodGraph(nn.Module):
    """A model method as a graph: (input [, labels]) -> its output(s). forward, encode, decode, generate."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return getattr(self.model, self.method)(x, labels)


class CachedGraph(nn.Module):
    """The incremental form's ``step``, ``row`` or ``window``: (row input, column, flag or advance, *caches
    [, labels]).

    step -> (log_probs (B, C, K), *caches); row -> *caches; window -> (log_probs (B, C, R, W, K), *caches).
    """

    def __init__(self, inc: IncrementalModel, method: str, conditional: bool) -> None:
        super().__init__()
        self.inc = inc
        self.method = method
        self.conditional = conditional

    def forward(self, x_row: torch.Tensor, where: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        caches, labels = (list(rest[:-1]), rest[-1]) if self.conditional else (list(rest), None)
        if self.method in ("step", "window"):
            log_probs, new = getattr(self.inc, self.method)(x_row, where, caches, labels)
            return (log_probs, *new)
        return tuple(self.inc.row(x_row, where, caches, labels))


class UpdatesGraph(nn.Module):
    """The incremental form's ``step`` returning only what it writes: (x_row, j, *caches [, labels]) ->
    (log_probs, then per cache each write in order: its values (B, F) for one column or (B, L, F) for a span,
    and for a column its position (1,)). A runtime applies them to its own buffers in place (the caches'
    positions are flat offsets into their axis 1), so a step's I/O no longer grows with the caches."""

    def __init__(self, inc: IncrementalModel, conditional: bool) -> None:
        super().__init__()
        self.inc = inc
        self.conditional = conditional

    def writes(self, x_row: torch.Tensor, j: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, list]:
        from .incremental import WriteLog

        caches, labels = (list(rest[:-1]), rest[-1]) if self.conditional else (list(rest), None)
        with WriteLog() as log:
            log_probs, new = self.inc.step(x_row, j, caches, labels)
        if any(n is not c for n, c in zip(new, caches, strict=True)):
            raise TypeError("this cached form changes a cache other than through write_column/write_row")
        return log_probs, [log.of(c) for c in caches]

    def forward(self, x_row: torch.Tensor, j: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        log_probs, writes = self.writes(x_row, j, *rest)
        outs = [log_probs]
        for entries in writes:
            for kind, where, value in entries:
                outs += [value, where] if kind == "column" else [value]
        return tuple(outs)


def updates_graph(step: GraphDef) -> GraphDef:
    """The ONNX-only ``step_updates`` graph beside ``step``, on the same cached form, with its write layout
    (the manifest's ``updates``) found by running the step once: which caches it writes, how (a column at a
    position the graph returns, or a span at a fixed offset) and in which order."""
    graph = UpdatesGraph(step.module.inc, step.module.conditional).eval()
    with torch.no_grad():
        _, writes = graph.writes(*step.make_inputs(2, torch.Generator().manual_seed(0)))
    outputs = [step.outputs[0]]
    layout: list[dict[str, Any]] = []
    for name, entries in zip(step.state, writes, strict=True):
        for k, (kind, where, value) in enumerate(entries):
            value_name = f"upd_{name}_{k}"
            outputs.append({"name": value_name, "shape": ["batch", *value.shape[1:]], "dtype": "float32"})
            entry = {"cache": name, "kind": kind, "value": value_name, "index": None, "offset": None, "axis": 1}
            if kind == "column":
                outputs.append({"name": f"at_{name}_{k}", "shape": [1], "dtype": "int64"})
                entry["index"] = f"at_{name}_{k}"
            else:
                entry["offset"] = int(where)
            layout.append(entry)
    return GraphDef("step_updates", graph, step.inputs, outputs, step.make_inputs, step.state,
                    extra={"updates": layout}, formats=("onnx",))


def label_inputs(c: Any) -> list[dict[str, Any]]:
    return [{"name": "labels", "shape": ["batch"], "dtype": "int64"}] if c.num_classes else []


def random_labels(c: Any, batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, c.num_classes, (batch,), generator=g),) if c.num_classes else ()


def random_images(c: Any, batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random levels (B, C, H, W) as float32 [, labels]."""
    x = torch.randint(0, c.levels, (batch, c.channels, c.height, c.width), generator=g).float()
    return (x, *random_labels(c, batch, g))


def random_latents(c: Any, batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, c.latent_size, generator=g), *random_labels(c, batch, g))


def cached_graphs(model: Any) -> list[GraphDef]:
    """The ``row`` and ``step`` graphs of the incremental form; caches are explicit inputs and outputs."""
    c = model.config
    inc = model.cached_form()
    specs = inc.cache_specs()
    cache_in = [{"name": f"cache_{n}", "shape": ["batch", *s], "dtype": "float32"} for n, s in specs]
    cache_out = [{"name": f"new_{n}", "shape": ["batch", *s], "dtype": "float32"} for n, s in specs]
    label_in = label_inputs(c)
    row_x = {"shape": ["batch", c.channels, c.width], "dtype": "float32"}

    def random_caches(batch: int, g: torch.Generator) -> list[torch.Tensor]:
        # Random caches exercise every weight; zeros would hide a wrong one.
        return [torch.randn((batch, *s), generator=g) for _, s in specs]

    def make_step(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randint(0, c.levels, (batch, c.channels, c.width), generator=g).float()
        j = torch.randint(0, c.width, (1,), generator=g)
        return (x, j, *random_caches(batch, g), *random_labels(c, batch, g))

    def make_row(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randint(0, c.levels, (batch, c.channels, c.width), generator=g).float()
        return (x, torch.ones(1), *random_caches(batch, g), *random_labels(c, batch, g))

    lp = {"name": "log_probs", "shape": ["batch", c.channels, c.levels], "dtype": "float32"}
    graphs = [
        GraphDef(
            "step", CachedGraph(inc, "step", bool(c.num_classes)),
            [{"name": "x_row", **row_x}, {"name": "j", "shape": [1], "dtype": "int64"}, *cache_in, *label_in],
            [lp, *cache_out], make_step, [n for n, _ in specs],
        ),
        GraphDef(
            "row", CachedGraph(inc, "row", bool(c.num_classes)),
            [{"name": "x_prev_row", **row_x}, {"name": "has_prev", "shape": [1], "dtype": "float32"},
             *cache_in, *label_in],
            cache_out, make_row, [n for n, _ in specs],
        ),
    ]
    # The ONNX runtime's step (TorchScript's step already writes its caches in place).
    graphs.append(updates_graph(graphs[0]))
    if inc.has_window:
        graphs.append(window_graph(inc, graphs[0], random_caches))
    return graphs


def window_graph(inc: IncrementalModel, step: GraphDef, random_caches: Callable) -> GraphDef:
    """``window``: whole rows at once over the caches, for windowed parallel decoding (docs/bundle.md). Its
    second dynamic dimension, ``rows``, is the number of rows in the window."""
    c = inc.config
    cache_in = [i for i in step.inputs if i["name"].startswith("cache_")]
    cache_out = [o for o in step.outputs if o["name"].startswith("new_")]

    def make_window(batch: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        # The row count follows the batch size, so the parity check (another batch size than the traced
        # example) also runs another number of rows.
        rows = min(c.height, 2 + batch % max(c.height - 1, 1))
        x = torch.randint(0, c.levels, (batch, c.channels, rows, c.width), generator=g).float()
        advance = torch.randint(0, rows, (1,), generator=g)
        return (x, advance, *random_caches(batch, g), *random_labels(c, batch, g))

    grid = ["batch", c.channels, "rows", c.width]
    return GraphDef(
        "window", CachedGraph(inc, "window", bool(c.num_classes)),
        [{"name": "x_rows", "shape": grid, "dtype": "float32"}, {"name": "advance", "shape": [1], "dtype": "int64"},
         *cache_in, *label_inputs(c)],
        [{"name": "log_probs", "shape": [*grid, c.levels], "dtype": "float32"}, *cache_out],
        make_window, step.state,
    )


def autoregressive_graphs(model: Any) -> list[GraphDef]:
    c = model.config
    inputs = [{"name": "x", "shape": ["batch", c.channels, c.height, c.width], "dtype": "float32"}, *label_inputs(c)]
    out = {"name": "log_probs", "shape": ["batch", c.channels, c.height, c.width, c.levels], "dtype": "float32"}
    graphs = [GraphDef("forward", MethodGraph(model, "__call__"), inputs, [out],
                       lambda batch, g: random_images(c, batch, g))]
    try:
        return graphs + cached_graphs(model)
    except TypeError:  # a model without a cached form: the bundle serves naive decoding only
        return graphs


def latent_graphs(model: Any) -> list[GraphDef]:
    """``encode``: x -> mean[, logvar]; ``decode``: z -> log_probs (VAE) or the reconstruction (autoencoder)."""
    c = model.config
    label_in = label_inputs(c)
    z_spec = {"shape": ["batch", c.latent_size], "dtype": "float32"}
    vae = model.variational
    enc_out = [{"name": "mean", **z_spec}] + ([{"name": "logvar", **z_spec}] if vae else [])
    image = ["batch", c.channels, c.height, c.width]
    dec_out = ({"name": "log_probs", "shape": [*image, c.levels], "dtype": "float32"} if vae
               else {"name": "x_mean", "shape": image, "dtype": "float32"})
    x_in = {"name": "x", "shape": image, "dtype": "float32"}
    return [
        GraphDef("encode", MethodGraph(model, "encode"), [x_in, *label_in], enc_out,
                 lambda batch, g: random_images(c, batch, g)),
        GraphDef("decode", MethodGraph(model, "decode"), [{"name": "z", **z_spec}, *label_in], [dec_out],
                 lambda batch, g: random_latents(c, batch, g)),
    ]


def gan_graphs(model: Any) -> list[GraphDef]:
    """``generate``: z [, labels] -> images in [-1, 1] (batch norm in inference mode)."""
    c = model.config
    out = {"name": "x_mean", "shape": ["batch", c.channels, c.height, c.width], "dtype": "float32"}
    z_in = {"name": "z", "shape": ["batch", c.latent_size], "dtype": "float32"}
    return [GraphDef("generate", MethodGraph(model, "generate"), [z_in, *label_inputs(c)], [out],
                     lambda batch, g: random_latents(c, batch, g))]

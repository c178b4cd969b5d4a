"""Each tensor once per format (bundle format 8).

Every graph of a model is a view of the same weights, and until format 7 each graph file carried its own
copy: a default gated PixelCNN's ``--format all`` bundle was 8.8x its weights. Now:

- ONNX: the graphs keep their tensors as external data. A tensor whose bytes are those of a tensor of
  ``weights.safetensors`` points into that file (a safetensors file is a JSON header followed by raw
  little-endian arrays, which is exactly what ONNX external data is); the tensors only the graphs have
  (a cached step's kernel columns, transposed or concatenated forms) are written once each to one shared
  ``onnx.data``, however many graphs use them. Tensors under ``MIN_EXTERNAL_BYTES`` stay inline.
- TorchScript: one archive whose graphs are its methods, traced together and frozen together, so that a
  parameter every graph reads is stored once.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from genforge.models.graphs import GraphDef
from genforge.runtime.bundle import safetensors_header

ONNX_DATA = "onnx.data"
TORCHSCRIPT_ARCHIVE = "graphs.pt"
MIN_EXTERNAL_BYTES = 1024  # onnx's own default threshold for external data
ALIGN = 64  # offsets of tensors in onnx.data (ORT may map an aligned tensor rather than copy it)


def safetensors_offsets(raw: bytes) -> dict[bytes, tuple[int, int]]:
    """sha256 of each tensor's bytes -> (offset in the file, length), for a safetensors file's bytes."""
    start, header = safetensors_header(raw, "the weights file")
    out: dict[bytes, tuple[int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = (start + int(x) for x in entry["data_offsets"])
        out.setdefault(hashlib.sha256(raw[begin:end]).digest(), (begin, end - begin))
    return out


def _tensors(graph: Any) -> Iterator[Any]:
    """The initializers of a graph and of every subgraph (Loop and If bodies) inside it."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors(sub)


def _strip_provenance(graph: Any) -> None:
    """Drop what the dynamo exporter records about each node's origin (the traced class hierarchy, FX node and
    stack trace in ``metadata_props``): about three quarters of a graph file once its tensors are external,
    read by no runtime, and it names source files of the machine that exported."""
    import onnx

    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _strip_provenance(sub)
    for value in [*graph.value_info, *graph.input, *graph.output]:
        del value.metadata_props[:]


def externalize_onnx(files: list[Path], weights: Path) -> dict[str, int]:
    """Rewrite the ONNX files (self-contained, in one directory with ``weights``), without provenance, so
    that their tensors of ``MIN_EXTERNAL_BYTES`` or more live in ``weights`` where its bytes hold them, and
    otherwise once in ``ONNX_DATA`` beside them (written only if some tensor needs it). Returns counts."""
    import onnx
    from onnx import numpy_helper

    in_weights = safetensors_offsets(weights.read_bytes())
    shared = bytearray()
    placed: dict[bytes, tuple[int, int]] = {}
    stats = {"tensors_in_weights": 0, "tensors_in_onnx_data": 0, "bytes_deduplicated": 0}
    for path in files:
        proto = onnx.load(str(path), load_external_data=False)
        _strip_provenance(proto.graph)
        for t in _tensors(proto.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
                continue
            array = numpy_helper.to_array(t)
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            digest = hashlib.sha256(raw).digest()
            if digest in in_weights:
                location, (offset, length) = weights.name, in_weights[digest]
                stats["tensors_in_weights"] += 1
            else:
                if digest not in placed:
                    shared.extend(b"\0" * (-len(shared) % ALIGN))
                    placed[digest] = (len(shared), len(raw))
                    shared.extend(raw)
                    stats["tensors_in_onnx_data"] += 1
                else:
                    stats["bytes_deduplicated"] += len(raw)
                location, (offset, length) = ONNX_DATA, placed[digest]
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        path.write_bytes(proto.SerializeToString())
    if shared:
        (weights.parent / ONNX_DATA).write_bytes(bytes(shared))
    stats["onnx_data_bytes"] = len(shared)
    return stats


def graph_methods(defs: list[GraphDef]) -> torch.nn.Module:
    """One module whose method NAME runs graph NAME, taking the manifest's input names as arguments
    (TorchScript takes a traced method's argument names from its Python signature)."""
    names = {g.name: [i["name"] for i in g.inputs] for g in defs}
    for g in defs:
        if not all(n.isidentifier() for n in [g.name, *names[g.name]]):
            raise ValueError(f"graph {g.name!r}: graph and input names must be identifiers, got {names[g.name]}")

    class Graphs(torch.nn.Module):
        pass

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for g in defs:
        def method(self: torch.nn.Module, *args: torch.Tensor, _name: str = g.name) -> Any:
            return getattr(self, f"graph_{_name}")(*args)

        method.__name__ = g.name
        method.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, positional) for n in ["self", *names[g.name]]])
        setattr(Graphs, g.name, method)
    container = Graphs()
    for g in defs:
        container.add_module(f"graph_{g.name}", g.module)
    return container.eval()


def trace_archive(defs: list[GraphDef], examples: dict[str, tuple[torch.Tensor, ...]]) -> Any:
    """The frozen TorchScript module of all ``defs``, one method each: freezing folds the parameters into
    constants once for the whole module, so graphs that read the same parameter share its storage."""
    container = graph_methods(defs)
    for p in container.parameters():
        p.requires_grad_(False)
    traced = torch.jit.trace_module(container, {g.name: tuple(t.clone() for t in examples[g.name]) for g in defs},
                                    check_trace=False)
    return torch.jit.freeze(traced, preserved_attrs=[g.name for g in defs])

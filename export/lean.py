"""Each tensor once per format (bundle format 8).

Every graph of a model is a view of the same weights, and until format 7 each graph file carried its own
copy: a default gated PixelCNN's ``--format all`` bundle was 8.8x its weights. Now:

- ONNX: the graphs keep their tensors as external data. A tensor whose bytes are those of a tensor of
  ``weights.safetensors`` points into that file (a safetensors file is a JSON header followed by raw
  little-endian arrays, which is exactly what ONNX external data is); the tensors only the graphs have
  (a cached step's kernel columns, transposed or concatenated forms) are written once each to one shared
  ``onnx.data``, however many graphs use them. Tensors under ``MIN_EXTERNAL_BYTES`` stay inline.
- TorchScript: one archive whose graphs are its methods, traced together and frozen together, so that a
  parameter every graph reads is stored once, written without ``torch.jit.save``'s debug records.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import zipfile
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


def _graphs(graph: Any) -> list[Any]:
    """A graph and every subgraph inside it (Loop and If bodies), outermost first."""
    import onnx

    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                out += _graphs(sub)
    return out


def _strip_provenance(graph: Any) -> None:
    """Drop what the dynamo exporter records about each node's origin (the traced class hierarchy, FX node and
    stack trace in ``metadata_props``): about three quarters of a graph file once its tensors are external,
    read by no runtime, and it names source files of the machine that exported. Node names go too.

    The intermediate values' shapes (``value_info``) stay, though onnxruntime could infer most of them: without
    them it optimises some graphs differently, and their results move in the last bits (measured on the Gated
    PixelCNN's window graph), which the exporter's re-verification rightly refuses."""
    for g in _graphs(graph):
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
            node.name = ""  # optional in ONNX, and unique-by-counter names ("node_Mul_593") are a sixth of a graph
        for value in [*g.value_info, *g.input, *g.output]:
            del value.metadata_props[:]


def _short_names(proto: Any) -> None:
    """Rename every value but the graph's own inputs and outputs (the manifest's names) to a short one: the
    exporter's names ("val_1234", "inner.model.blocks.3.conv.weight") were a third of an unrolled graph's file,
    written in each node that reads or writes them and again in ``value_info``. One map for the graph and its
    subgraphs, as a Loop body reads the outer graph's values by name."""
    keep = {v.name for v in [*proto.graph.input, *proto.graph.output]}
    names: dict[str, str] = {"": ""}  # "" is an omitted optional input

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            n, digits = len(names), ""
            while True:
                n, r = divmod(n, 36)
                digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
                if n == 0:
                    break
            if f"_{digits}" in keep:
                raise ValueError(f"graph input or output '_{digits}' clashes with the short names")
            names[name] = f"_{digits}"  # no exporter's name, nor an identifier the manifest uses, looks like this
        return names[name]

    for graph in _graphs(proto.graph):
        for t in graph.initializer:
            t.name = short(t.name)
        for v in [*graph.value_info, *graph.input, *graph.output]:
            v.name = short(v.name)
        for node in graph.node:
            node.input[:] = [short(i) for i in node.input]
            node.output[:] = [short(o) for o in node.output]


class _Derivations:
    """Finds a tensor's bytes as a run of consecutive elements of a weight with its axes permuted: the forms a
    graph folds out of a weight (a 1x1 kernel as a matrix, transposed for a Gemm; one tap of a (k, 1) kernel;
    a cached step's top rows). Such a tensor need not be stored: a few nodes make it from the weight, and
    onnxruntime folds those nodes into a constant when it loads the graph, so nothing is computed per call."""

    def __init__(self, weights: Path) -> None:
        from safetensors.numpy import load_file

        self.weights = {k: v for k, v in load_file(str(weights)).items() if v.ndim >= 2}
        self.raw = {k: v.tobytes() for k, v in self.weights.items()}
        self.permuted: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def find(self, array: Any, raw: bytes) -> tuple[str, tuple[int, ...], int, tuple[int, ...]] | None:
        """(weight name, axis permutation, element offset, order) with ``array`` (``raw``: its little-endian
        bytes), its axes put in ``order``, equal to elements offset .. offset + array.size of the weight
        permuted and flattened, or None. ``order`` is not the identity for a part of a kernel cut along an axis
        that is not the weight's first (the rows a folded masked convolution keeps, models/layers.py)."""
        import itertools

        import numpy as np

        for name, w in self.weights.items():
            if w.dtype != array.dtype or w.size < array.size:
                continue
            # Whatever the permutations, the first and last elements are somewhere in the weight: a cheap test
            # that spares permuting (24 copies of a 4-d weight) every weight that is not the source.
            k = w.itemsize
            if raw[:k] not in self.raw[name] or raw[-k:] not in self.raw[name]:
                continue
            for order in itertools.permutations(range(array.ndim)):
                run = raw if order == tuple(range(array.ndim)) else np.ascontiguousarray(
                    array.transpose(order)).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                for perm in itertools.permutations(range(w.ndim)):
                    key = (name, perm)
                    if key not in self.permuted:
                        self.permuted[key] = np.ascontiguousarray(w.transpose(perm)).tobytes()
                    flat, at = self.permuted[key], -1
                    while (at := flat.find(run, at + 1)) >= 0:
                        if at % w.itemsize == 0:
                            return name, perm, at // w.itemsize, order
        return None


def _derive(graph: Any, tensor: Any, how: tuple[str, tuple[int, ...], int, tuple[int, ...]], source: Any) -> None:
    """Replace initializer ``tensor`` of ``graph`` by nodes that make it from ``source`` (an initializer of the
    weight, external data in the weights file), as ``how`` says: Transpose, flatten, Slice, Reshape, and a
    Transpose back where the tensor's axes were reordered."""
    import numpy as np
    from onnx import helper, numpy_helper

    _, perm, offset, order = how
    n = int(np.prod(tensor.dims))
    v = f"{tensor.name}/"  # a prefix no exporter's name has: the values below are unique to this tensor
    identity = order == tuple(range(len(order)))
    shape = [int(tensor.dims[a]) for a in order]
    consts = {v + "a": [0], v + "b": [offset], v + "e": [offset + n], v + "f": [-1], v + "s": shape}
    nodes = []
    value = source.name
    if perm != tuple(range(len(perm))):
        nodes.append(helper.make_node("Transpose", [value], [v + "t"], perm=list(perm)))
        value = v + "t"
    nodes += [helper.make_node("Reshape", [value, v + "f"], [v + "r"]),
              helper.make_node("Slice", [v + "r", v + "b", v + "e", v + "a"], [v + "x"]),
              helper.make_node("Reshape", [v + "x", v + "s"], [tensor.name if identity else v + "o"])]
    if not identity:
        nodes.append(helper.make_node("Transpose", [v + "o"], [tensor.name], perm=np.argsort(order).tolist()))
    graph.initializer.remove(tensor)
    graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in consts.items())
    for node in reversed(nodes):  # first: the graph's nodes are in order, and these feed the rest
        graph.node.insert(0, node)


def _point_at(t: Any, location: str, offset: int, length: int) -> None:
    """Make tensor ``t`` external data: ``length`` bytes at ``offset`` of file ``location``."""
    import onnx

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def externalize_onnx(files: list[Path], weights: Path) -> dict[str, int]:
    """Rewrite the ONNX files (self-contained, in one directory with ``weights``), without provenance, so
    that their tensors of ``MIN_EXTERNAL_BYTES`` or more live in ``weights`` where its bytes hold them, and
    otherwise once in ``ONNX_DATA`` beside them (written only if some tensor needs it). Returns counts."""
    import onnx
    from onnx import numpy_helper

    in_weights = safetensors_offsets(weights.read_bytes())
    shared = bytearray()
    placed: dict[bytes, tuple[int, int]] = {}
    stats = {"tensors_in_weights": 0, "tensors_in_onnx_data": 0, "bytes_deduplicated": 0, "tensors_derived": 0}
    derivations = _Derivations(weights)
    for path in files:
        proto = onnx.load(str(path), load_external_data=False)
        _strip_provenance(proto.graph)
        sources: dict[tuple[int, str], Any] = {}  # (graph's index, weight) -> the initializer reading that weight
        for index, graph, t in [(i, g, t) for i, g in enumerate(_graphs(proto.graph)) for t in g.initializer]:
            if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
                continue
            array = numpy_helper.to_array(t)
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            digest = hashlib.sha256(raw).digest()
            how = None if digest in in_weights else derivations.find(array, raw)
            if how is not None:
                key = (index, how[0])
                if key not in sources:
                    w = derivations.weights[how[0]]
                    if any(i.name == f"{how[0]}/weights" for i in graph.initializer):
                        raise ValueError(f"{path.name}: an initializer is already named {how[0]}/weights")
                    source = numpy_helper.from_array(w, f"{how[0]}/weights")
                    _point_at(source, weights.name, *in_weights[hashlib.sha256(w.tobytes()).digest()])
                    graph.initializer.append(source)
                    sources[key] = source
                _derive(graph, t, how, sources[key])
                stats["tensors_derived"] += 1
                continue
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
            _point_at(t, location, offset, length)
        _short_names(proto)
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
    looped = [m for m in container.modules() if hasattr(m, "script_loops")]  # models/pixelrnn.py
    for m in looped:
        m.script_loops = True
    try:
        traced = torch.jit.trace_module(
            container, {g.name: tuple(t.clone() for t in examples[g.name]) for g in defs}, check_trace=False)
    finally:
        for m in looped:
            m.script_loops = False
    return torch.jit.freeze(traced, preserved_attrs=[g.name for g in defs])


def save_archive(module: Any, path: Path) -> None:
    """Save a TorchScript module without its ``.debug_pkl`` records. Those map the archive's code back to the
    exporter's source (they hold the text of every genforge file the trace went through, with the
    exporting machine's paths): a fifth of a Diagonal BiLSTM archive, which no loader needs
    (``torch.jit.load`` reads them only when present, for error messages)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.compress_type = info.compress_type  # torch deflates the code and stores tensors as they are
            out.writestr(entry, src.read(info))

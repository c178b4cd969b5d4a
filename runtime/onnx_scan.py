"""What an ONNX file would make onnxruntime read besides itself: the external-data locations of its tensors.

The runtime imports neither torch nor onnx, so this walks the protobuf wire format itself, over the few
messages that can hold a tensor (field numbers from onnx/onnx.proto [1]): the graph's initializers and
sparse initializers, node attributes (tensors, sparse tensors and subgraphs, which ``Loop`` and ``If``
use), model-local functions and training graphs. A tensor whose ``data_location`` is EXTERNAL names a file
in its ``external_data`` entries (key ``location``), which onnxruntime opens relative to the model's
directory when the session is created; the bundle reader must see those names before onnxruntime does.

[1]: https://github.com/onnx/onnx/blob/main/onnx/onnx.proto
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import BundleError

# (message, field number) -> the message type of that field, for the fields that lead to tensors.
_CHILDREN = {
    ("model", 7): "graph",  # ModelProto.graph
    ("model", 20): "training",  # ModelProto.training_info
    ("model", 25): "function",  # ModelProto.functions
    ("training", 1): "graph",  # TrainingInfoProto.initialization
    ("training", 2): "graph",  # TrainingInfoProto.algorithm
    ("graph", 1): "node",  # GraphProto.node
    ("graph", 5): "tensor",  # GraphProto.initializer
    ("graph", 15): "sparse",  # GraphProto.sparse_initializer
    ("function", 7): "node",  # FunctionProto.node
    ("function", 11): "attribute",  # FunctionProto.attribute_proto (defaults)
    ("node", 5): "attribute",  # NodeProto.attribute
    ("attribute", 5): "tensor",  # AttributeProto.t
    ("attribute", 6): "graph",  # AttributeProto.g
    ("attribute", 10): "tensor",  # AttributeProto.tensors
    ("attribute", 11): "graph",  # AttributeProto.graphs
    ("attribute", 22): "sparse",  # AttributeProto.sparse_tensor
    ("attribute", 23): "sparse",  # AttributeProto.sparse_tensors
    ("sparse", 1): "tensor",  # SparseTensorProto.values
    ("sparse", 2): "tensor",  # SparseTensorProto.indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DEPTH = 64  # nested subgraphs deeper than this are refused rather than recursed into


@dataclass
class ExternalTensor:
    """A tensor stored outside the ONNX file: its name and the ``external_data`` entries (location, offset,
    length, checksum) as strings."""

    name: str
    entries: dict[str, str] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return self.entries.get("location", "")


def _varint(data: bytes | memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes | memoryview | int]]:
    """(field number, wire type, value) of one message: bytes (a view) for length-delimited fields, ints
    otherwise. One-byte keys and lengths, most of a graph's, are read inline: this loop runs once per field of
    every node, and a bundle is scanned on every load."""
    i, end = 0, len(data)
    while i < end:
        key = data[i]
        if key < 0x80:
            i += 1
        else:
            key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield number, wire, value
        elif wire == 1:
            i += 8
            yield number, wire, 0
        elif wire == 2:
            if i < end and data[i] < 0x80:
                n = data[i]
                i += 1
            else:
                n, i = _varint(data, i)
            if i + n > end:
                raise ValueError("a field runs past the end of its message")
            yield number, wire, data[i : i + n]
            i += n
        elif wire == 5:
            i += 4
            yield number, wire, 0
        else:  # groups (3, 4) are not used by onnx.proto
            raise ValueError(f"unexpected wire type {wire}")
        if i > end:
            raise ValueError("truncated message")


def _tensor(data: bytes | memoryview) -> ExternalTensor | None:
    name, entries, location = "", {}, 0
    for number, wire, value in _fields(data):
        if number == _TENSOR_NAME and wire == 2:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif number == _TENSOR_LOCATION and wire == 0:
            location = int(value)  # type: ignore[arg-type]
        elif number == _TENSOR_EXTERNAL and wire == 2:
            key = val = ""
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if w == 2 and n in (1, 2):
                    text = bytes(v).decode("utf-8", "replace")  # type: ignore[arg-type]
                    key, val = (text, val) if n == 1 else (key, text)
            entries[key] = val
    if location == _EXTERNAL or entries:
        return ExternalTensor(name, entries)
    return None


def external_tensors(model: bytes, where: object = "the ONNX file") -> list[ExternalTensor]:
    """Every tensor of a serialized ModelProto that lives in external data. Raises BundleError on bytes
    that are not a well-formed protobuf message."""
    found: list[ExternalTensor] = []

    def walk(data: bytes | memoryview, kind: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise BundleError(f"{where}: ONNX subgraphs nested deeper than {MAX_DEPTH} levels")
        if kind == "tensor":
            t = _tensor(data)
            if t is not None:
                found.append(t)
            return
        for number, wire, value in _fields(data):
            child = _CHILDREN.get((kind, number))
            if child is not None and wire == 2:
                walk(value, child, depth + 1)  # type: ignore[arg-type]

    try:
        walk(memoryview(model), "model", 0)  # slices of a view copy nothing
    except ValueError as e:
        raise BundleError(f"{where}: not a well-formed ONNX file ({e})") from None
    return found

"""Inspecting a bundle's TorchScript archive before anything in it runs.

A TorchScript archive is a program, not data: ``torch.jit.load`` compiles the archive's code and runs any
``__setstate__`` method it finds (a scripted ``__setstate__`` calling ``torch.from_file`` reads or creates a
file while the module loads), and calling the module runs its methods, which may call any operator torch
has (``aten::from_file``, ``aten::save``, ``prim::Print``...). genforge's exporter writes frozen traced
modules: methods made of tensor operations (format 8: one method per graph, in one archive; before: one
``forward`` per archive), no submodules, no hooks, no state methods. So:

- ``check_archive`` (before loading): the zip is well formed with no duplicate names, holds no code that
  mentions ``__setstate__`` and no custom C++ class (``torch.classes``), and is not a decompression bomb.
- ``check_module`` (after loading, before any call): every method of the module and its submodules, inlined
  with all its sub-blocks, uses only the operations of ``TORCHSCRIPT_OPS``, the set the exporter produces for
  every family (``tests/test_untrusted.py`` exports each family and fails on an operation missing here, so a
  new operation in an export fails a test, not a user); hooks are refused.

Imports torch; only the TorchScript backend uses this module.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from .errors import BundleError

# Everything genforge's TorchScript exports contain, over every family and head (inlined graphs, sub-blocks
# included). Tensor arithmetic and shape bookkeeping only: nothing here reads or writes a file, prints or
# calls out of the graph (prim::CallMethod / prim::CallFunction are absent, so nothing escapes inspection).
# The Diagonal BiLSTM's column recurrence is one loop (models/pixelrnn.py column_lstm): prim::Loop, whose
# body is inspected like the rest, and the list and conv1d operations in it.
TORCHSCRIPT_OPS = frozenset({
    "aten::Int", "aten::__and__", "aten::__getitem__", "aten::_convolution", "aten::abs", "aten::add", "aten::addmm",
    "aten::append", "aten::arange", "aten::batch_norm", "aten::cat", "aten::chunk", "aten::clamp", "aten::contiguous",
    "aten::conv1d", "aten::copy_", "aten::div", "aten::embedding", "aten::exp", "aten::flatten", "aten::flip",
    "aten::full_like", "aten::ge", "aten::index_copy_", "aten::index_select", "aten::linear", "aten::log",
    "aten::log1p", "aten::log_softmax", "aten::logsumexp", "aten::lt", "aten::movedim", "aten::mul", "aten::neg",
    "aten::new_zeros", "aten::one_hot", "aten::pad", "aten::permute", "aten::reciprocal", "aten::relu",
    "aten::reshape", "aten::rsub", "aten::select", "aten::sigmoid", "aten::silu", "aten::size", "aten::slice",
    "aten::stack", "aten::sub", "aten::tanh", "aten::to", "aten::transpose", "aten::unsqueeze",
    "aten::upsample_nearest2d", "aten::where", "aten::zeros_like", "prim::Constant", "prim::ListConstruct",
    "prim::ListUnpack", "prim::Loop", "prim::NumToTensor", "prim::TupleConstruct", "prim::device", "prim::dtype",
})
# Of those, what only earlier exports contain, kept so that their bundles still load: aten::copy_ is the
# Diagonal BiLSTM's skew as it was before it became a pad and a reshape (a copy into each row).
FORMER_EXPORTS_ONLY = frozenset({"aten::copy_"})

MAX_UNCOMPRESSED = 4 << 30  # bytes an archive may unpack to (torch stores its entries uncompressed)


def check_archive(data: bytes, where: object) -> None:
    """Refuse an archive that would run code while it loads, or that is not a plain TorchScript zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise BundleError(f"{where}: the TorchScript archive names an entry twice")
            if sum(i.file_size for i in infos) > MAX_UNCOMPRESSED:
                raise BundleError(f"{where}: the TorchScript archive unpacks to more than {MAX_UNCOMPRESSED} bytes")
            for info in infos:
                parts = info.filename.split("/")
                if len(parts) < 2:
                    continue
                inner = "/".join(parts[1:])
                if inner.startswith("code/") and inner.endswith(".py"):
                    text = z.read(info)  # zipfile checks the local header's name against the directory's
                    if b"__setstate__" in text:
                        raise BundleError(f"{where}: the TorchScript archive defines __setstate__, which would run "
                                          "while it loads (genforge's exporter writes none)")
                    if b"torch.classes" in text:
                        raise BundleError(f"{where}: the TorchScript archive uses a custom C++ class")
                elif inner.endswith(".pkl") and b"torch.classes" in z.read(info):
                    raise BundleError(f"{where}: the TorchScript archive holds a custom C++ class")
    except BundleError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise BundleError(f"{where}: not a TorchScript archive ({type(e).__name__}: {e})") from None


def _kinds(block: Any, found: set[str]) -> None:
    for node in block.nodes():
        found.add(node.kind())
        for sub in node.blocks():
            _kinds(sub, found)


def module_ops(module: Any) -> dict[str, set[str]]:
    """method ("forward", "sub.forward", ...) -> the operation kinds of its inlined graph, sub-blocks included."""
    import torch

    out: dict[str, set[str]] = {}
    for prefix, sub in module.named_modules():
        c = sub._c
        for name in c._method_names():
            graph = c._get_method(name).graph.copy()
            torch._C._jit_pass_inline(graph)
            found: set[str] = set()
            _kinds(graph, found)
            out[f"{prefix}.{name}" if prefix else name] = found
    return out


def check_module(module: Any, where: object) -> None:
    """Refuse a loaded module any of whose methods uses an operation genforge's exporter does not write."""
    for _, sub in module.named_modules():
        if sub._c._get_forward_hooks() or sub._c._get_forward_pre_hooks():
            raise BundleError(f"{where}: the TorchScript module has hooks (genforge's exporter writes none)")
    for method, ops in module_ops(module).items():
        foreign = sorted(ops - TORCHSCRIPT_OPS)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise BundleError(f"{where}: the TorchScript method {method!r} uses operations genforge's exporter never "
                              f"writes ({shown}); refusing to run it")


def check_torchscript_signature(module: Any, spec: Any, where: object, *, exact: bool = True) -> None:
    """The graph's method (``spec.method``) must take the manifest's inputs (by name, in order) and return as
    many values as the manifest declares."""
    method = getattr(spec, "method", "forward")
    try:
        schema = module._c._get_method(method).schema
    except RuntimeError:
        raise BundleError(f"{where}: the TorchScript archive has no {method} method") from None
    names = [a.name for a in schema.arguments[1:]]  # [0] is self
    if exact and names != spec.input_names:
        raise BundleError(f"{where}: the graph's inputs {names} are not the manifest's {spec.input_names}")
    if not exact and len(names) < len(spec.input_names):
        raise BundleError(f"{where}: the graph takes {len(names)} inputs, the manifest declares "
                          f"{len(spec.input_names)}")
    returns = schema.returns[0].type if schema.returns else None
    elements = getattr(returns, "elements", None)
    count = len(elements()) if callable(elements) else 1
    if count != len(spec.outputs):
        raise BundleError(f"{where}: the graph returns {count} values, the manifest declares {len(spec.outputs)}")

"""Export a trained run to a bundle of ONNX and/or TorchScript graphs, verified against eager PyTorch.

Each model says which graphs it exports (``model.export_graphs()``, models/graphs.py): a wrapper module
with named inputs and outputs and a way to draw random inputs. Every graph is verified after export: eager
and exported outputs are compared on fresh random inputs at a batch size other than the one traced (so the dynamic batch
dimension is exercised too); the largest difference goes into the manifest and the export fails if it
exceeds the tolerance.

ONNX uses torch's supported exporter (``dynamo=True``: torch.export, then onnxscript's torchlib), which needs
opset 18 or later. It exports every graph of every family correctly (parity below 1e-6 on the tiny test
models); should it fail or miss the tolerance on some graph, that graph alone falls back to the deprecated
TorchScript-based exporter (``dynamo=False``) and the manifest says so and why (``exporter``,
``exporter_fallback``). Opsets below 18 use the TorchScript-based exporter only. The TorchScript archive uses
``torch.jit.trace`` (the graphs have no data-dependent control flow), isolated in ``_export_torchscript`` so
that a ``torch.export`` / AOTInductor package can later sit beside it. Every tensor is stored once per format
(bundle format 8, export/lean.py): the weights are written first, then the ONNX graphs' tensors are moved
into external data in them and in one shared ``onnx.data``, and each ONNX graph is verified again as rewritten.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import secrets
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genforge.models.graphs import GraphDef
from genforge.models.incremental import OnnxOps
from genforge.models.layers import MaskedConv2d
from genforge.runtime.bundle import (
    BINDING_KEY,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    GRAPH_FORMATS,
    MANIFEST,
    manifest_binding,
    read_bundle,
    sha256_file,
)
from genforge.runtime.files import (
    aside_name,
    atomic_write_json,
    clean_dead_siblings,
    exclusive_lock,
    make_public_dir,
    replace_dir,
)
from genforge.runtime.randomness import SCHEME
from genforge.train.checkpoint import best_record, load_run, save_weights

from .errors import ExportError
from .lean import ONNX_DATA, TORCHSCRIPT_ARCHIVE, externalize_onnx, save_archive, trace_archive
from .sample_graph import SAMPLE_GRAPH, build_sample_graph, verify_sample_graph

WEIGHTS = "weights.safetensors"
DEFAULT_OPSET = 18  # the dynamo exporter's first opset (DYNAMO_MIN_OPSET)
DEFAULT_TOLERANCE = 1e-4  # max |eager - exported| / (1 + |eager| / 50) on float32 outputs (verify)


@contextlib.contextmanager
def _quiet_export() -> Any:
    # The TorchScript-based exporters warn about their own deprecation and about traced shape checks;
    # parity verification below is what tells whether the trace is right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


DYNAMO_MIN_OPSET = 18  # onnxscript's torchlib emits opset 18 and later


def onnx_exporters(opset: int) -> tuple[str, ...]:
    """The ONNX exporters to try, in order: the supported one first where the opset allows it."""
    return ("dynamo", "torchscript-based") if opset >= DYNAMO_MIN_OPSET else ("torchscript-based",)


def _onnx_proto(g: GraphDef, example: tuple[torch.Tensor, ...], opset: int, exporter: str) -> Any:
    import onnx

    names_in = [i["name"] for i in g.inputs]
    names_out = [o["name"] for o in g.outputs]
    # Named dimensions are dynamic: "batch" everywhere, "rows" in the window graph.
    named = [{axis: d for axis, d in enumerate(spec["shape"]) if isinstance(d, str)} for spec in g.inputs]
    # torch.export prints the graph it traced to stderr when a step reads a data-dependent column (.item());
    # the export succeeds and parity verification decides, so that is noise to a gen-export user.
    with _quiet_export(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            _quiet_logger("torch.onnx"), OnnxOps(exporter):
        if exporter == "dynamo":
            dims = {d: torch.export.Dim(d, min=1) for axes in named for d in axes.values()}
            program = torch.onnx.export(
                # Named parameters: torch.export maps dynamic_shapes onto the signature, which *rest would hide.
                _with_argument_names(g.module, names_in), example, dynamo=True, input_names=names_in,
                output_names=names_out,
                dynamic_shapes=tuple({a: dims[d] for a, d in axes.items()} or None for axes in named),
                opset_version=opset, optimize=True, verbose=False,
            )
            return program.model_proto
        dynamic = {spec["name"]: {a: d for a, d in enumerate(spec["shape"]) if isinstance(d, str)}
                   for spec in g.inputs + g.outputs}
        dynamic = {name: axes for name, axes in dynamic.items() if axes}
        buf = io.BytesIO()
        torch.onnx.export(
            g.module, example, buf, input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
        return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _quiet_logger(name: str) -> Any:
    # The dynamo exporter logs its progress and, without torchvision, four "Skipping torchvision::..." lines
    # per graph through logging, whose handlers hold the real stderr.
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_onnx(
    g: GraphDef, path: Path, example: tuple[torch.Tensor, ...], opset: int, exporter: str | None = None
) -> list[str]:
    """Write the ONNX graph with ``exporter`` (default: the first of ``onnx_exporters(opset)``); returns the
    names of the inputs the file takes (the TorchScript-based exporter drops inputs a graph never reads, e.g.
    caches the gated model's ``row`` recomputes)."""
    import onnx

    proto = _onnx_proto(g, example, opset, exporter or onnx_exporters(opset)[0])
    # The exporter names dimensions it cannot prove fixed ("LogSoftmaxlog_probs_dim_3", even "batch" for a
    # height); write the declared shapes into the file, so what a client reads there is the manifest's.
    declared = {spec["name"]: spec["shape"] for spec in g.inputs + g.outputs}
    for value in [*proto.graph.input, *proto.graph.output]:
        shape = declared.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"graph {g.name!r} fails onnx.checker: {str(e).splitlines()[0]}") from None
    path.write_bytes(proto.SerializeToString())
    initializers = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in initializers]


def _with_argument_names(module: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """``module`` behind a forward whose parameters are ``names``: torch.export maps ``dynamic_shapes`` onto
    the Python signature, which ``*rest`` would hide (the TorchScript archive names its methods' arguments
    the same way, export/lean.py)."""
    if not all(n.isidentifier() for n in names):
        raise ExportError(f"graph input names must be identifiers, got {names}")

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: torch.Tensor) -> Any:
            return self.inner(*args)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    Graph.forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, positional) for n in ["self", *names]]
    )
    return Graph().eval()


def _export_torchscript(defs: list[GraphDef], path: Path, examples: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """The bundle's one TorchScript archive, graph NAME its method NAME (export/lean.py)."""
    with _quiet_export(), torch.no_grad():
        save_archive(trace_archive(defs, examples), path)


def mutated_inputs(path: Path, g: GraphDef) -> list[str]:
    """The inputs a TorchScript graph writes into in place, found by running the file: a cached step
    updates its caches in place (copying them out of place would dominate a step), so the manifest says so."""
    with _quiet_export():
        module = torch.jit.load(str(path), map_location="cpu")
    args = g.make_inputs(2, torch.Generator().manual_seed(1))
    before = [a.clone() for a in args]
    with torch.no_grad():
        getattr(module, g.name)(*args)
    return [spec["name"] for spec, a, b in zip(g.inputs, args, before, strict=True) if not torch.equal(a, b)]


def _run_exported(fmt: str, path: Path, g: GraphDef, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}  # the exporter drops inputs a graph never reads
        feed = {spec["name"]: t.numpy() for spec, t in zip(g.inputs, inputs, strict=True) if spec["name"] in wanted}
        return list(sess.run(None, feed))
    with _quiet_export():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = getattr(module, g.name)(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in outs]


def verify(fmt: str, path: Path, g: GraphDef, *, batch: int = 3, seed: int | None = None) -> dict[str, Any]:
    """The largest eager-vs-exported difference over every output on fresh random inputs: absolute, and
    scaled as the export's float32 policy has it, |a - b| / (1 + |a| / 50), i.e. an absolute 1e-4 plus 2e-6
    of the value (about 30 float32 ulps, the rounding of a chain of a few dozen operations). Random caches
    drive a step's log-probabilities to -250 and below, where rounding alone reaches 3e-4; a log-probability
    near -9 that errs by 3e-4 (the Log(Sigmoid) export, models/heads.py) is still caught."""
    seed = secrets.randbits(31) if seed is None else seed
    inputs = g.make_inputs(batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a cached step may update its caches in place: give each run its own copy
        eager = g.module(*[t.clone() for t in inputs])
    eager_outs = eager if isinstance(eager, (tuple, list)) else (eager,)
    exported = _run_exported(fmt, path, g, tuple(t.clone() for t in inputs))
    worst = scaled = 0.0
    for name, a, b in zip([o["name"] for o in g.outputs], eager_outs, exported, strict=True):
        a_np = a.detach().numpy().astype(np.float64)
        if a_np.shape != b.shape:
            raise ExportError(f"{fmt} graph {g.name!r} output {name!r} has shape {b.shape}, eager {a_np.shape}")
        diff = np.abs(a_np - b.astype(np.float64))
        worst = max(worst, float(np.max(diff, initial=0.0)))
        scaled = max(scaled, float(np.max(diff / (1.0 + np.abs(a_np) / 50.0), initial=0.0)))
    return {"max_abs_diff": worst, "max_scaled_diff": scaled, "batch": batch, "seed": seed}


def _export_verified(
    g: GraphDef, fmt: str, path: Path, example: tuple[torch.Tensor, ...], opset: int, tolerance: float
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Export one graph and verify it: (the inputs its file takes, how it was exported, the parity check).
    An ONNX graph the supported exporter cannot export within the tolerance is exported by the
    TorchScript-based one, and the returned record says why. TorchScript graphs are methods of one archive,
    written before (``_export_torchscript``); here they are verified."""
    exporters = onnx_exporters(opset) if fmt == "onnx" else ("torch.jit.trace",)
    failures: list[str] = []
    for exporter in exporters:
        last = exporter == exporters[-1]
        try:
            with torch.no_grad():
                if fmt == "onnx":
                    taken = _export_onnx(g, path, tuple(t.clone() for t in example), opset, exporter)
                    inputs = [spec for spec in g.inputs if spec["name"] in taken]  # what the file takes
                else:
                    inputs = g.inputs
        except ExportError:
            raise
        except Exception as e:  # the dynamo exporter raises many types; the fallback is what handles them
            if _interrupted(e):
                raise KeyboardInterrupt from None
            if last:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failures.append(f"{exporter}: {type(e).__name__}: {first[:300]}")
            continue
        check = verify(fmt, path, g)
        check["tolerance"] = tolerance
        if check["max_scaled_diff"] <= tolerance:
            how = {"exporter": exporter} if fmt == "onnx" else {}
            if failures:
                how["exporter_fallback"] = "; ".join(failures)
            return inputs, how, check
        failures.append(f"{exporter}: differs from eager PyTorch by {check['max_scaled_diff']:.3g}")
        if last:
            raise ExportError(
                f"{fmt} graph {g.name!r} differs from eager PyTorch by {check['max_scaled_diff']:.3g} "
                f"(|eager - export| / (1 + |eager| / 50); tolerance {tolerance:g})"
                + (f"; tried {'; '.join(failures[:-1])}" if len(failures) > 1 else "")
            )
    raise AssertionError("unreachable")


def _reverified(g: GraphDef, path: Path, first: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The parity check again on the rewritten file (its tensors now external data), with the same inputs:
    moving bytes must not change a result."""
    check = verify("onnx", path, g, seed=first["seed"], batch=first["batch"])
    if check["max_abs_diff"] != first["max_abs_diff"]:
        raise ExportError(f"onnx graph {g.name!r} computes differently with its tensors as external data "
                          f"(largest difference {check['max_abs_diff']:.3g}, {first['max_abs_diff']:.3g} before)")
    return {**check, "tolerance": tolerance}


def _cache_spec(step: GraphDef, name: str) -> dict[str, Any]:
    spec = next(o for o in step.outputs if o["name"] == f"new_{name}")
    return {"shape": spec["shape"], "dtype": spec["dtype"]}


def _write_sample_graph(tmp: Path, step: GraphDef, cfg: Any) -> dict[str, Any]:
    """Compose sample.onnx from the row and step files just written (export/sample_graph.py); its manifest
    entry."""
    import onnx

    caches = [(n, tuple(_cache_spec(step, n)["shape"][1:])) for n in step.state]
    proto = build_sample_graph(
        onnx.load(str(tmp / "row.onnx")), onnx.load(str(tmp / "step.onnx")), caches=caches, height=cfg.height,
        width=cfg.width, channels=cfg.channels, levels=cfg.levels, conditional=bool(cfg.num_classes),
    )
    (tmp / f"{SAMPLE_GRAPH}.onnx").write_bytes(proto.SerializeToString())
    image = ["batch", cfg.height, cfg.width, cfg.channels]
    inputs = [{"name": "uniforms", "shape": image, "dtype": "float64"},
              {"name": "prefix", "shape": image, "dtype": "uint8"},
              {"name": "start_row", "shape": [1], "dtype": "int64"}]
    if cfg.num_classes:
        inputs.append({"name": "labels", "shape": ["batch"], "dtype": "int64"})
    return {"format": "onnx", "file": f"{SAMPLE_GRAPH}.onnx", "role": SAMPLE_GRAPH, "inputs": inputs,
            "outputs": [{"name": "images", "shape": image, "dtype": "uint8"}], "state": [], "mutates_inputs": []}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    formats: tuple[str, ...] = ("onnx",),
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    ema: bool = False,
    weights: str | None = None,
) -> Path:
    """Export the model of a run directory into a bundle directory ``out``; returns its path. ``weights``:
    "last", "ema" or "best" (train.checkpoint.weights_file); ``ema=True`` is ``weights="ema"``."""
    weights = weights or ("ema" if ema else "last")
    for fmt in formats:
        if fmt not in GRAPH_FORMATS:
            raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(GRAPH_FORMATS)}")
    if not str(out).strip():
        raise ExportError("the bundle directory (-o) is empty")
    out = Path(out)
    check_bundle_target(Path(run_dir), out, overwrite=overwrite)
    with exclusive_lock(out.parent / f".{out.name}.lock", f"bundle directory {out}"):
        # Holding the lock, any staging or set-aside directory of this bundle is a killed writer's.
        clean_dead_siblings(out)
        check_bundle_target(Path(run_dir), out, overwrite=overwrite)  # again: it may have changed while unlocked
        with interrupts_raise():
            return _export_locked(Path(run_dir), out, formats, opset, tolerance, weights)


class _Interrupted:
    """Whether SIGINT arrived during an export: torch.export wraps the KeyboardInterrupt in its own error,
    which the per-graph fallback would otherwise take for an exporter failure."""

    seen = False


@contextlib.contextmanager
def interrupts_raise() -> Any:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        _Interrupted.seen = True
        raise KeyboardInterrupt

    _Interrupted.seen = False
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(e: BaseException) -> bool:
    """An interrupt, however wrapped (the exception chain holds a KeyboardInterrupt, or SIGINT arrived)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return _Interrupted.seen


def check_bundle_target(run_dir: Path, out: Path, *, overwrite: bool) -> None:
    """``out`` may be written only where nothing but a bundle is lost: never the run being exported (or a
    directory holding it), never a directory that is not a genforge bundle."""
    run_abs, out_abs = run_dir.resolve(), out.resolve()
    if out_abs == run_abs or out_abs in run_abs.parents:
        raise ExportError(f"{out}: refusing to write the bundle over the run directory {run_dir} it exports from")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out}: output directory exists and is not empty (pass --overwrite)")
    if not is_bundle_dir(out):
        raise ExportError(f"{out}: refusing to overwrite a directory that is not a genforge bundle")


def is_bundle_dir(path: Path) -> bool:
    """A directory whose manifest.json names the genforge bundle format (any version, hashes unchecked: an
    old or damaged bundle may be replaced, a user's other files may not)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT


def _export_locked(
    run_dir: Path, out: Path, formats: tuple[str, ...], opset: int, tolerance: float, weights: str
) -> Path:
    model, run = load_run(run_dir, weights=weights)
    # source.ema says whether the weights are a moving average (the best ones are, where the run kept one).
    ema = weights == "ema" or (weights == "best" and best_record(run_dir).get("weights") == "ema")
    model = model.float().cpu().eval()
    for m in model.modules():
        if isinstance(m, MaskedConv2d):
            m.fold_mask()  # each graph then stores the masked weight once, not weight and mask
    # Wrappers in eval mode too: the ONNX exporter restores each wrapper's own mode afterwards, recursively,
    # which would put batch norm back into training mode before verification.
    defs = model.export_graphs()
    for g in defs:
        g.module.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside_name(out, "staging")
    tmp.mkdir()
    make_public_dir(tmp)  # it becomes the bundle directory
    try:
        cfg = model.config
        by_name = {g.name: g for g in defs}
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "family": model.family,
            "model": run.model,
            "model_config": cfg.to_dict(),
            "image": {"channels": cfg.channels, "height": cfg.height, "width": cfg.width},
            "levels": cfg.levels,
            "num_classes": cfg.num_classes,
            **model.bundle_fields(),  # likelihood, latent_size, prior
        }
        if "step" in by_name:
            manifest["caches"] = [{"name": n, **_cache_spec(by_name["step"], n)} for n in by_name["step"].state]
        # The weights first: the Triton backend runs its own kernels on them, the ONNX graphs read their
        # tensors from them (export/lean.py), and their metadata keeps the manifest's bound fields, so a reader
        # can tell an edited manifest (check_binding).
        save_weights(tmp / WEIGHTS, model, metadata={BINDING_KEY: manifest_binding(manifest)})
        examples = {g.name: g.make_inputs(2, torch.Generator().manual_seed(0)) for g in defs}
        scripted = [g for g in defs if "torchscript" in formats and "torchscript" in g.formats]
        if scripted:
            _export_torchscript(scripted, tmp / TORCHSCRIPT_ARCHIVE, examples)
        graphs: dict[str, Any] = {}
        parity: dict[str, Any] = {}
        for g in defs:
            for fmt in formats:
                if fmt not in g.formats:
                    continue
                fname = f"{g.name}.onnx" if fmt == "onnx" else TORCHSCRIPT_ARCHIVE
                path = tmp / fname
                inputs, how, check = _export_verified(g, fmt, path, examples[g.name], opset, tolerance)
                key = f"{g.name}.{fmt}"
                taken_names = {i["name"] for i in inputs}
                given = {o["name"] for o in g.outputs}
                graphs[key] = {
                    "format": fmt, "file": fname, **({"method": g.name} if fmt == "torchscript" else {}),
                    "role": g.name, "inputs": inputs, "outputs": g.outputs,
                    "state": [{"cache": n, "input": f"cache_{n}" if f"cache_{n}" in taken_names else None,
                               "output": f"new_{n}" if f"new_{n}" in given else None} for n in g.state],
                    "mutates_inputs": mutated_inputs(path, g) if fmt == "torchscript" else [],
                    **how, **g.extra,
                }
                parity[key] = check
        if "onnx" in formats and "step" in by_name and "row" in by_name:
            graphs[f"{SAMPLE_GRAPH}.onnx"] = _write_sample_graph(tmp, by_name["step"], model.config)
        onnx_files = sorted({g["file"] for g in graphs.values() if g["format"] == "onnx"})
        external: list[str] = []
        if onnx_files:
            externalize_onnx([tmp / f for f in onnx_files], tmp / WEIGHTS)
            external = [ONNX_DATA] if (tmp / ONNX_DATA).exists() else []
            for key, g in graphs.items():  # the graphs as they will run, reading their external data
                if g["format"] == "onnx" and key in parity:
                    parity[key] = _reverified(by_name[g["role"]], tmp / g["file"], parity[key], tolerance)
        manifest.update({
            "graphs": graphs,
            "decoders": (["naive", "cached"] if any(k.startswith("step.") for k in graphs) else ["naive"])
            + (["graph"] if f"{SAMPLE_GRAPH}.onnx" in graphs else []),
            "randomness": SCHEME,
            "parity": parity,
            "opset": opset if "onnx" in formats else None,
            "versions": {"genforge": _version("genforge"), "torch": torch.__version__, "onnx": _version("onnx")},
            # The training data and seed: gen-eval scores the split this model never trained on (carved
            # splits depend on the seed). Optional; readers ignore what they do not know.
            "source": {"run_dir": str(Path(run_dir).resolve()), "ema": ema, "data": run.data,
                       "seed": run.train.get("seed"), "dynamic_binarize": bool(run.train.get("dynamic_binarize"))},
            "weights": WEIGHTS,
            "files": {f: sha256_file(tmp / f)
                      for f in sorted({*(g["file"] for g in graphs.values()), *external, WEIGHTS})},
        })
        atomic_write_json(tmp / MANIFEST, manifest)
        read_bundle(tmp)  # the bundle must pass the runtime's own validation before it is published
        if f"{SAMPLE_GRAPH}.onnx" in graphs:
            check = verify_sample_graph(tmp)
            if check["mismatched_subpixels"]:
                raise ExportError(f"sample.onnx differs from cached decoding in {check['mismatched_subpixels']} "
                                  "sub-pixels on fresh uniforms")
            manifest["parity"][f"{SAMPLE_GRAPH}.onnx"] = check
            atomic_write_json(tmp / MANIFEST, manifest)
            read_bundle(tmp)
        if _Interrupted.seen:
            raise KeyboardInterrupt
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

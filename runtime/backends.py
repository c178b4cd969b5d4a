"""Backends run a bundle's graphs on numpy arrays: onnxruntime and TorchScript.

The ONNX backend imports onnxruntime only; torch is imported inside the TorchScript backend alone, so an
application that embeds the ONNX path needs numpy and onnxruntime and nothing else.

Both load from the bytes ``read_bundle`` read and hashed (``Bundle.read``), never from the path again.

TorchScript note: a TorchScript archive is a program: its code runs when the module is called, and a
``__setstate__`` method runs while it loads. So before ``torch.jit.load`` the archive is scanned, and before
any graph runs every method is inspected against the operations genforge's own exporter writes
(``runtime/torchscript_check.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from typing import Any, Protocol

import numpy as np

from .bundle import Bundle, BundleError
from .decoding import Stepper
from .errors import RuntimeBackendError


class Backend(Protocol):
    name: str
    device: str
    graph_format: str | None  # the format of the bundle's graphs it runs ("onnx", "torchscript"), or None
    fused: bool  # decodes whole images itself (decode_images) rather than stepping a cached form

    @classmethod
    def splits_cached_batch_on(cls, device: str) -> bool: ...

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def stepper(self) -> Stepper: ...


def cache_inputs(bundle: Bundle, fmt: str) -> list[tuple[str, tuple[int, ...]]]:
    """(input name, shape without batch) of the step graph's caches, in argument order: the inputs its manifest
    ``state`` pairs with a cache (bundles whose graphs have no ``state`` name them ``cache_*``)."""
    step = bundle.graph("step", fmt)
    state = bundle.manifest["graphs"][f"step.{fmt}"].get("state")
    fed = {s["input"] for s in state if s.get("input")} if state is not None else None
    return [(i["name"], tuple(int(d) for d in i["shape"][1:])) for i in step.inputs
            if (i["name"] in fed if fed is not None else i["name"].startswith("cache_"))]


def cuda_visible() -> bool:
    """A cheap, torch-free check that an NVIDIA device node exists."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


class OnnxBackend:
    name = "onnx"
    graph_format = "onnx"  # the bundle's graphs it runs
    fused = False
    # A decoding step is a chain of tiny ops: intra-op threads only add synchronization, so these run on one.
    single_threaded_graphs = ("step", "row", "step_updates")

    @classmethod
    def splits_cached_batch_on(cls, device: str) -> bool:
        """Whether cached decoding should split a large batch between threads: on the CPU, where the step
        graphs run single-threaded (single_threaded_graphs), one stepper per core uses the cores."""
        return device == "cpu"

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeBackendError("the onnx backend needs onnxruntime (pip install onnxruntime)") from None
        self._ort = ort
        self.bundle = bundle
        available = ort.get_available_providers()
        want_cuda = device == "cuda" or (device == "auto" and cuda_visible())
        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeBackendError(f"unknown device {device!r}; choose auto, cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise RuntimeBackendError("device 'cuda' asked for, but onnxruntime has no CUDAExecutionProvider")
        self.providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if want_cuda and "CUDAExecutionProvider" in available
            else ["CPUExecutionProvider"]
        )
        self.device = "cpu"
        self._sessions: dict[str, Any] = {}
        self._explicit = device

    def session(self, graph: str) -> Any:
        if graph not in self._sessions:
            spec = self.bundle.graph(graph, "onnx")
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3  # keep provider fallback chatter out of the user's terminal
            if graph in self.single_threaded_graphs:
                opts.intra_op_num_threads = 1
            try:
                with onnx_model_source(self.bundle, spec, opts) as source:
                    sess = self._ort.InferenceSession(source, sess_options=opts, providers=self.providers)
            except BundleError:
                raise
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(f"{self.bundle.file(spec)}: onnxruntime cannot load the graph ({first})") from None
            check_onnx_signature(sess, spec, self.bundle.file(spec), exact=self.bundle.manifest["version"] >= 3)
            active = sess.get_providers()
            if self._explicit == "cuda" and "CUDAExecutionProvider" not in active:
                raise RuntimeBackendError("device 'cuda' asked for, but onnxruntime could not start CUDA here")
            self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
            self._sessions[graph] = sess
        return self._sessions[graph]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.session(graph)
        try:
            return list(sess.run(None, inputs))
        except Exception as e:
            if (error := onnx_run_error(e, self.bundle.file(self.bundle.graph(graph, "onnx")))) is None:
                raise
            raise error from None

    def stepper(self) -> Stepper:
        return OnnxStepper(self)


def onnx_run_error(e: Exception, where: object) -> BundleError | None:
    """The error to raise for ``e``, raised while onnxruntime ran the graph of file ``where``, or None where
    ``e`` is not onnxruntime's (genforge's own: raise it as it is). A graph that loads but fails when it runs
    (found by the mutation tests: a rehashed graph with one byte flipped, reshaping to a shape no tensor has)
    is a bad bundle, said in one line as for one that fails to load."""
    if not type(e).__module__.startswith("onnxruntime"):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BundleError(f"{where}: onnxruntime failed running the graph ({first})")


@contextlib.contextmanager
def onnx_model_source(bundle: Bundle, spec: Any, opts: Any) -> Any:
    """What InferenceSession loads: the graph's verified bytes, its external files (format 8: the weights
    and onnx.data) handed to onnxruntime from the verified bytes too. An onnxruntime without that API (before
    1.20) gets a private directory holding copies of the verified files instead (it resolves external data
    beside the model's path), removed once the session exists."""
    external = bundle.external_data(spec)
    if not external:
        yield bundle.read(spec.file)
        return
    if hasattr(opts, "add_external_initializers_from_files_in_memory"):
        buffers = [bundle.read(name) for name in external]
        opts.add_external_initializers_from_files_in_memory(external, buffers, [len(b) for b in buffers])
        yield bundle.read(spec.file)
        return
    tmp = tempfile.mkdtemp(prefix="genforge-onnx-")
    try:
        for name in [spec.file, *external]:
            target = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(bundle.read(name))
        yield os.path.join(tmp, *spec.file.split("/"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_onnx_signature(sess: Any, spec: Any, path: Any, *, exact: bool = True) -> None:
    """The ONNX file's real inputs and outputs must be those the manifest declares (names, order, ranks and
    every fixed dimension). Bundles before format 3 may list inputs the file lacks (``exact=False``)."""
    declared_in = {i["name"]: i["shape"] for i in spec.inputs}
    real_out = [o.name for o in sess.get_outputs()]
    if real_out != spec.output_names:
        raise BundleError(f"{path}: the graph's outputs {real_out} are not the manifest's {spec.output_names}")
    real_in = [i.name for i in sess.get_inputs()]
    if exact and real_in != spec.input_names:
        raise BundleError(f"{path}: the graph's inputs {real_in} are not the manifest's {spec.input_names}")
    pairs = [(i, declared_in.get(i.name)) for i in sess.get_inputs()]
    pairs += [(o, d["shape"]) for o, d in zip(sess.get_outputs(), spec.outputs, strict=True)]
    for arg, shape in pairs:
        if shape is None:
            raise BundleError(f"{path}: the graph takes an input {arg.name!r} that the manifest does not declare")
        fixed = [(a, b) for a, b in zip(arg.shape, shape, strict=False) if isinstance(a, int) and isinstance(b, int)]
        if len(arg.shape) != len(shape) or any(a != b for a, b in fixed):
            raise BundleError(f"{path}: {arg.name!r} has shape {arg.shape} in the graph but {shape} in the manifest")


UpdatePlan = list[tuple[int, str, str, str | None, int | None, int]]


class OnnxStepper:
    """Cached decoding on onnxruntime. On CUDA the caches stay on the device as OrtValues bound with I/O
    binding, so a step copies only the current row in and one pixel's log-probabilities out."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend
        self.caches_spec = cache_inputs(backend.bundle, "onnx")
        self.step_sess = backend.session("step")
        self.row_sess = backend.session("row")
        self.on_gpu = backend.device == "cuda"
        self.caches: list[Any] = []
        self.labels: np.ndarray | None = None
        self.row_flag = {True: np.ones(1, np.float32), False: np.zeros(1, np.float32)}
        # On the CPU, the step_updates graph returns only what a step writes; the writes go into the numpy
        # caches in place, so a step's I/O does not grow with the caches (see step()).
        entry = backend.bundle.manifest["graphs"].get("step_updates.onnx")
        self.update_plan: UpdatePlan | None = None
        if entry is not None and not self.on_gpu:
            self.updates_sess = backend.session("step_updates")
            position = {name[len("cache_"):]: i for i, (name, _) in enumerate(self.caches_spec)}
            # Formats 4-5 kept the caches channel-major and wrote along their last axis (no "axis" field).
            try:
                self.update_plan = [(position[u["cache"]], u["kind"], u["value"], u["index"], u["offset"],
                                     u.get("axis", 2)) for u in entry["updates"]]
            except (KeyError, TypeError):
                raise BundleError(f"{backend.bundle.path}: step_updates.onnx's 'updates' name a cache or field "
                                  "the bundle lacks") from None
            self.update_outputs = [o.name for o in self.updates_sess.get_outputs()]
            self._check_update_plan()

    def _check_update_plan(self) -> None:
        """The manifest's ``updates`` say where step_updates' writes go, and no graph states it; applied as
        they say, the writes must leave the caches the step graph returns, checked on random caches at the
        first and the last column (an edited offset shifts a write and samples silently differ)."""
        bundle = self.backend.bundle
        _, w, c = bundle.image_shape
        rng = np.random.default_rng(0)
        batch = 2
        self.reset(batch, np.arange(batch) % bundle.num_classes if bundle.num_classes else None)
        start = [rng.standard_normal(z.shape).astype(np.float32) for z in self.caches]
        problem = None
        for j in sorted({0, w - 1}):
            first = {"x_row": rng.integers(0, bundle.levels, (batch, c, w)).astype(np.float32),
                     "j": np.array([j], dtype=np.int64)}
            self.caches = [z.copy() for z in start]
            full = self._run(self.step_sess, first, 1)
            self.caches = [z.copy() for z in start]
            try:
                values = dict(zip(self.update_outputs, self._run(self.updates_sess, first, 0), strict=True))
                apply_updates(self.caches, self.update_plan or [], values)
                got = [values["log_probs"], *self.caches]
            except (KeyError, IndexError, ValueError, TypeError) as e:
                problem = f"applying them fails ({type(e).__name__}: {e})"
                break
            for a, b in zip(full, got, strict=False):
                if len(full) != len(got) or a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
                    problem = f"at column {j} they leave other caches or log-probabilities than the step graph"
                    break
            if problem:
                break
        self.caches, self.labels = [], None
        if problem:
            raise BundleError(f"{bundle.path}: step_updates.onnx's writes as the manifest's 'updates' place them "
                              f"do not match step.onnx: {problem}")

    # step_updates from this batch size on: below it, applying the writes from Python costs about what the
    # cache copies it saves (a full-cache step against step_updates, timed when format 6 brought them; the
    # committed decoding run has no per-graph figure, so the note of the issue that chose 4 holds the timings).
    updates_min_batch = 4

    def reset(self, batch: int, labels: np.ndarray | None) -> None:
        self.use_updates = self.update_plan is not None and batch >= self.updates_min_batch
        ort = self.backend._ort
        zeros = [np.zeros((batch, *shape), dtype=np.float32) for _, shape in self.caches_spec]
        self.caches = [ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0) for z in zeros] if self.on_gpu else zeros
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)

    def _run(self, sess: Any, first: dict[str, np.ndarray], host_outputs: int) -> list[Any]:
        try:
            return self._run_graph(sess, first, host_outputs)
        except Exception as e:
            graph = {id(self.step_sess): "step", id(self.row_sess): "row"}.get(id(sess), "step_updates")
            bundle = self.backend.bundle
            if (error := onnx_run_error(e, bundle.file(bundle.graph(graph, "onnx")))) is None:
                raise
            raise error from None

    def _run_graph(self, sess: Any, first: dict[str, np.ndarray], host_outputs: int) -> list[Any]:
        # The exporter drops inputs a graph never reads (the row graph recomputes some caches), so feed only
        # the inputs the session declares.
        wanted = {i.name for i in sess.get_inputs()}
        host = {**first, **({"labels": self.labels} if self.labels is not None else {})}
        caches = {name: value for (name, _), value in zip(self.caches_spec, self.caches, strict=True)}
        if not self.on_gpu:
            feed = {k: v for k, v in {**host, **caches}.items() if k in wanted}
            return list(sess.run(None, feed))
        binding = sess.io_binding()
        for k, v in host.items():
            if k in wanted:
                binding.bind_cpu_input(k, v)
        for k, v in caches.items():
            if k in wanted:
                binding.bind_ortvalue_input(k, v)
        outputs = [o.name for o in sess.get_outputs()]
        for i, name in enumerate(outputs):
            binding.bind_output(name, "cpu" if i < host_outputs else "cuda")
        sess.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [v.numpy() if i < host_outputs else v for i, v in enumerate(values)]

    def row(self, x_prev_row: np.ndarray, has_prev: bool) -> None:
        self.caches = self._run(self.row_sess, {"x_prev_row": x_prev_row.astype(np.float32, copy=False),
                                                "has_prev": self.row_flag[has_prev]}, 0)

    def step(self, x_row: np.ndarray, j: int) -> np.ndarray:
        first = {"x_row": x_row.astype(np.float32, copy=False), "j": np.array([j], dtype=np.int64)}
        if not self.use_updates:
            out = self._run(self.step_sess, first, 1)
            self.caches = out[1:]
            return out[0]
        values = dict(zip(self.update_outputs, self._run(self.updates_sess, first, 0), strict=True))
        apply_updates(self.caches, self.update_plan or [], values)
        return values["log_probs"]


def apply_updates(caches: list[np.ndarray], plan: UpdatePlan, values: dict[str, np.ndarray]) -> None:
    """Apply a ``step_updates`` call's writes to the caches in place, in the manifest's order: per entry
    (cache position, kind, value output, index output, offset, position axis). Bundle format 6 writes along
    axis 1 of (B, N, F) caches, formats 4-5 along axis 2 of (B, F, N) ones."""
    for cache, kind, value, index, offset, axis in plan:
        buf, v = caches[cache], values[value]
        if kind == "column":
            at: Any = int(values[index][0])  # type: ignore[index]
        else:
            at = slice(offset, offset + v.shape[axis])
        if axis == 1:
            buf[:, at] = v
        else:
            buf[:, :, at] = v


class TorchScriptBackend:
    name = "torchscript"
    graph_format = "torchscript"
    fused = False

    @classmethod
    def splits_cached_batch_on(cls, device: str) -> bool:
        return False  # torch's own threads already work inside each step

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        try:
            import torch
        except ImportError:
            raise RuntimeBackendError("the torchscript backend needs torch") from None
        self._torch = torch
        self.bundle = bundle
        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeBackendError(f"unknown device {device!r}; choose auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeBackendError("device 'cuda' asked for, but torch sees no CUDA device")
        self.device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        self._modules: dict[str, Any] = {}
        self._archives: dict[str, Any] = {}

    def module(self, graph: str) -> Any:
        """The callable that runs ``graph``: its method of the archive it lives in (format 8: one archive,
        all graphs; before: one archive per graph, its ``forward``)."""
        if graph not in self._modules:
            from .torchscript_check import check_torchscript_signature

            spec = self.bundle.graph(graph, "torchscript")
            archive = self._archive(spec.file)
            check_torchscript_signature(archive, spec, self.bundle.file(spec),
                                        exact=self.bundle.manifest["version"] >= 3)
            self._modules[graph] = getattr(archive, spec.method)
        return self._modules[graph]

    def _archive(self, file: str) -> Any:
        if file not in self._archives:
            from .torchscript_check import check_archive, check_module

            where = self.bundle.path / file
            data = self.bundle.read(file)
            check_archive(data, where)  # before torch.jit.load, which runs a __setstate__ it finds
            try:
                with warnings.catch_warnings():  # torch.jit.load warns of its own deprecation on every call
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = self._torch.jit.load(io.BytesIO(data), map_location=self.device)
            except Exception as e:  # torch raises RuntimeError and others for foreign archives
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(f"{where}: torch cannot load the graph ({first})") from None
            check_module(m, where)  # every method's operations, before any of them runs
            self._archives[file] = m.eval()
        return self._archives[file]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        spec = self.bundle.graph(graph, "torchscript")
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in spec.input_names]
        with torch.inference_mode():
            out = self.module(graph)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    def stepper(self) -> Stepper:
        return TorchScriptStepper(self)


class TorchScriptStepper:
    """Cached decoding on TorchScript; the caches stay torch tensors on the backend's device."""

    def __init__(self, backend: TorchScriptBackend) -> None:
        self.backend = backend
        self.torch = backend._torch
        self.caches_spec = cache_inputs(backend.bundle, "torchscript")
        self.step_mod = backend.module("step")
        self.row_mod = backend.module("row")
        self.caches: list[Any] = []
        self.extra: list[Any] = []
        dev = backend.device
        self.flags = {f: self.torch.tensor([1.0 if f else 0.0], device=dev) for f in (True, False)}
        width = backend.bundle.image_shape[1]
        self.columns = [self.torch.tensor([j], device=dev) for j in range(width)]

    def reset(self, batch: int, labels: np.ndarray | None) -> None:
        t, dev = self.torch, self.backend.device
        self.caches = [t.zeros((batch, *shape), device=dev) for _, shape in self.caches_spec]
        self.extra = [] if labels is None else [t.from_numpy(np.asarray(labels, dtype=np.int64)).to(dev)]

    # No autograd context per call: the graphs are frozen (their weights are constants) and the inputs never
    # require grad, so nothing is recorded, and entering a context on every step costs more than the step's
    # arithmetic at small batch sizes.
    def _tensor(self, a: np.ndarray) -> Any:
        x = self.torch.from_numpy(a)
        return x if self.backend.device == "cpu" else x.to(self.backend.device, non_blocking=True)

    def row(self, x_prev_row: np.ndarray, has_prev: bool) -> None:
        self.caches = list(self.row_mod(self._tensor(x_prev_row), self.flags[has_prev], *self.caches, *self.extra))

    def step(self, x_row: np.ndarray, j: int) -> np.ndarray:
        out = self.step_mod(self._tensor(x_row), self.columns[j], *self.caches, *self.extra)
        self.caches = list(out[1:])
        return out[0].cpu().numpy()


BACKENDS = ("auto", "onnx", "torchscript", "triton")
DEVICES = ("auto", "cpu", "cuda")


def _triton_usable(device: str) -> bool:
    """For backend="auto": Triton on a CUDA device when triton imports. Torch is only imported when an
    NVIDIA device is visible, so the CPU ONNX path stays torch-free."""
    if device == "cpu" or not cuda_visible():
        return False
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_backend(bundle: Bundle, backend: str = "auto", device: str = "auto") -> Backend:
    if backend not in BACKENDS:
        raise RuntimeBackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise RuntimeBackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_visible():
        # Fail here rather than at the first sample: onnxruntime-gpu lists its CUDA provider on any machine.
        raise RuntimeBackendError("device 'cuda' asked for, but this machine has no NVIDIA GPU")
    if backend == "auto" and "weights" in bundle.manifest and _triton_usable(device):
        backend = "triton"
    if backend == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(bundle, device)
    if backend == "auto":
        backend = "onnx" if "onnx" in bundle.formats else "torchscript"
    if backend not in bundle.formats:
        raise BundleError(f"{bundle.path}: the bundle has no {backend} graphs (it has: {', '.join(bundle.formats)})")
    return OnnxBackend(bundle, device) if backend == "onnx" else TorchScriptBackend(bundle, device)

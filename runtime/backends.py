"""Backends run a bundle's graphs on numpy arrays: onnxruntime and TorchScript.

The ONNX backend imports onnxruntime only; torch is imported inside the TorchScript backend alone, so an
application that embeds the ONNX path needs numpy and onnxruntime and nothing else.

TorchScript note: a TorchScript archive holds TorchScript graphs, which run when the module is called; it is
not Python and genforge never unpickles arbitrary objects from it. The bundle's sha256 hashes are checked
before any backend opens a file.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Protocol

import numpy as np

from .bundle import Bundle, BundleError


class RuntimeBackendError(RuntimeError):
    """A backend cannot run here (missing package, no CUDA device) or cannot load a graph."""


class Backend(Protocol):
    name: str
    device: str

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def cuda_visible() -> bool:
    """A cheap, torch-free check that an NVIDIA device node exists."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


class OnnxBackend:
    name = "onnx"

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
            try:
                sess = self._ort.InferenceSession(
                    str(self.bundle.file(spec)), sess_options=opts, providers=self.providers
                )
            except Exception as e:  # onnxruntime raises its own exception types for bad graphs
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(f"{self.bundle.file(spec)}: onnxruntime cannot load the graph ({first})") from None
            active = sess.get_providers()
            if self._explicit == "cuda" and "CUDAExecutionProvider" not in active:
                raise RuntimeBackendError("device 'cuda' asked for, but onnxruntime could not start CUDA here")
            self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
            self._sessions[graph] = sess
        return self._sessions[graph]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session(graph).run(None, inputs))


class TorchScriptBackend:
    name = "torchscript"

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

    def module(self, graph: str) -> Any:
        if graph not in self._modules:
            spec = self.bundle.graph(graph, "torchscript")
            try:
                with warnings.catch_warnings():  # torch.jit.load warns of its own deprecation on every call
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = self._torch.jit.load(str(self.bundle.file(spec)), map_location=self.device)
            except Exception as e:  # torch raises RuntimeError and others for foreign archives
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BundleError(f"{self.bundle.file(spec)}: torch cannot load the graph ({first})") from None
            self._modules[graph] = m.eval()
        return self._modules[graph]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        spec = self.bundle.graph(graph, "torchscript")
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in spec.input_names]
        with torch.inference_mode():
            out = self.module(graph)(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]


BACKENDS = ("auto", "onnx", "torchscript")


def make_backend(bundle: Bundle, backend: str = "auto", device: str = "auto") -> Backend:
    if backend not in BACKENDS:
        raise RuntimeBackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnx" if "onnx" in bundle.formats else "torchscript"
    if backend not in bundle.formats:
        raise BundleError(f"{bundle.path}: the bundle has no {backend} graphs (it has: {', '.join(bundle.formats)})")
    return OnnxBackend(bundle, device) if backend == "onnx" else TorchScriptBackend(bundle, device)

"""The Triton backend: a bundle's weights run by genforge's own Triton kernels.

- Full forward passes (likelihoods, naive decoding): the model rebuilt from the manifest's config and the
  bundle's safetensors weights, with every masked convolution computed by the masked-conv kernel
  (``triton_kernels/masked_conv.py``), weights packed once at load.
- Cached decoding of a PixelCNN or gated PixelCNN: the fused kernels (``triton_kernels/pixelcnn_decode.py``,
  ``gated_decode.py``), one launch per batch of whole images (a program per tile), sampling in the kernel from the same
  pre-drawn uniforms. PixelRNNs decode with their incremental form in PyTorch on the same device (their
  fused kernel is future work).

It needs CUDA, or ``TRITON_INTERPRET=1`` on the CPU (correctness tests only: the interpreter is slow).
Loading imports genforge.models to rebuild the network from its config; weights load with safetensors, so no
code from the bundle runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .bundle import Bundle
from .decoding import Stepper
from .errors import BundleError, RuntimeBackendError


class TritonBackend:
    name = "triton"
    graph_format = None  # it rebuilds the network from the weights and runs no graph file

    @classmethod
    def splits_cached_batch_on(cls, device: str) -> bool:
        return False

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        try:
            import torch

            from genforge.triton_kernels import masked_conv
        except ImportError as e:
            raise RuntimeBackendError(f"the triton backend needs torch and triton ({e})") from None
        if masked_conv.triton is None:
            raise RuntimeBackendError("the triton backend needs triton (pip install triton)")
        self.torch = torch
        self.bundle = bundle
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeBackendError(f"unknown device {device!r}; choose auto, cpu or cuda")
        if device == "cpu" and not interpreting:
            raise RuntimeBackendError("the triton backend runs on CUDA (on the CPU only with TRITON_INTERPRET=1)")
        if device in ("auto", "cuda") and not torch.cuda.is_available():
            if device == "cuda" or not interpreting:
                raise RuntimeBackendError("the triton backend needs a CUDA device (torch sees none)")
            device = "cpu"
        self.device = "cuda" if device in ("auto", "cuda") else "cpu"
        self.model = self._load_model()
        self._packed: Any = None
        from genforge.triton_kernels.decoders import fused_decoder

        self._decoder = fused_decoder(bundle.model, bundle.manifest.get("likelihood"))

    def _load_model(self) -> Any:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        from genforge.models import build_model
        from genforge.triton_kernels.masked_conv import masked_conv2d_packed, pack_masked_conv

        m = self.bundle.manifest
        if "weights" not in m:
            raise BundleError(f"{self.bundle.path}: the bundle has no weights file for the triton backend")
        try:
            model = build_model(m["model"], m["model_config"])
            state = load_safetensors(self.bundle.read(str(m["weights"])))  # the bytes hashed at load
            model.load_state_dict(state)
        except (SafetensorError, ValueError, RuntimeError, KeyError) as e:
            raise BundleError(f"{self.bundle.path}: cannot rebuild the model from its weights ({e})") from None
        model = model.float().eval().to(self.device)
        for conv in model.masked_convs():
            packed = pack_masked_conv(conv.weight.detach(), conv.mask, conv.bias)
            # Bound per module: the kernel replaces F.conv2d, the module's weights stay for the cached form.
            conv.forward = (lambda p: (lambda x: masked_conv2d_packed(x.contiguous(), p)))(packed)
        return model

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if graph != "forward":
            raise RuntimeBackendError(f"the triton backend runs the forward graph, not {graph!r}")
        t = self.torch
        x = t.from_numpy(np.ascontiguousarray(inputs["x"])).to(self.device)
        labels = inputs.get("labels")
        lab = None if labels is None else t.from_numpy(labels).to(self.device)
        with t.inference_mode():
            return [self.model(x, lab).float().cpu().numpy()]

    def stepper(self) -> Stepper:
        from genforge.models.incremental import EagerStepper

        return EagerStepper(self.model.cached_form(), self.torch.float32)

    @property
    def fused(self) -> bool:
        return self._decoder is not None

    def decode_images(
        self, u: np.ndarray, labels: np.ndarray | None, prefix: np.ndarray | None, start_row: int
    ) -> np.ndarray:
        """Whole images by the fused kernel: u (B, H, W, C) -> uint8 levels (B, H, W, C)."""
        t = self.torch
        d = self._decoder
        if d is None:
            raise RuntimeBackendError(f"no fused decoder for {self.bundle.model} with this likelihood")
        if self._packed is None:
            self._packed = d.pack(self.model, self.device)
        lab = None if labels is None else t.from_numpy(np.asarray(labels, dtype=np.int64))
        pre = None if prefix is None else t.from_numpy(prefix.transpose(0, 3, 1, 2).copy())
        x = d.decode(self._packed, t.from_numpy(u), labels=lab, prefix=pre, start_row=start_row)
        return x.permute(0, 2, 3, 1).round().to(t.uint8).cpu().numpy()

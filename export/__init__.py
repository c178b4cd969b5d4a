"""genforge.export: ONNX and TorchScript export of trained runs into verified bundles."""

from .errors import ExportError
from .exporter import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_run, verify

__all__ = ["DEFAULT_OPSET", "DEFAULT_TOLERANCE", "ExportError", "export_run", "verify"]

"""genforge.export: ONNX and TorchScript export of trained runs into verified bundles."""

from .exporter import DEFAULT_OPSET, DEFAULT_TOLERANCE, ExportError, export_run, graph_defs, verify

__all__ = ["DEFAULT_OPSET", "DEFAULT_TOLERANCE", "ExportError", "export_run", "graph_defs", "verify"]

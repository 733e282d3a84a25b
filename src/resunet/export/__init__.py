"""Exporting a trained model to self-describing ONNX / TorchScript files."""

"""The stock ONNX Runtime CPU descriptor lives in descriptor.json beside this file."""

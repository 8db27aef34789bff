"""ONNX export of an SD3 pipeline and the onnxruntime-backed modules that replace its networks."""

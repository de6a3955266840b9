"""The ONNX models shipped with segd (see README.md in this folder)."""

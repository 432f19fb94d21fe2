"""ONNX: export from torch, annotations, TensorRT's 2:4 rules, precision (FP16/BF16/INT8 Q/DQ)."""

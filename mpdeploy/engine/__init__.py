"""The engine stage: `onnx/` artifact -> `engine-<backend>/` artifact."""

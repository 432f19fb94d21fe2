"""The export stage: `pruned/` (or `distilled/`) artifact -> `onnx/` artifact."""

"""The densify stage: give the layers an engine ran dense their dense weights back.

A layer pruned to 2:4 that the engine runs with dense kernels (TensorRT kept the faster dense tactic,
torch did not convert it, or its sparse kernel timed slower) loses accuracy for nothing. `stage.py`
reads the engine's own report and writes a new `pruned` artifact with those layers dense again;
`evidence.py` (which layers ran sparse, pure) and `weights.py` (tensors, masks, records, pure) hold
the parts.
"""

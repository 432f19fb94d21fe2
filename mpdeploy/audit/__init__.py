"""The audit stage: the sparse engine against its dense twin, measured in one run -> `audit/` artifact.

`stage.py` runs it, one step after another: `subject.py` (open the engine, its weights source and the
evaluation data), `accuracy.py` (both engines over the images, the PyTorch reference), the timing in
`stage.py` itself, `verdict.py` (the N:M weight check, the gates, the caveats), `result.py` (audit.json),
`plots.py` and `markdown.py` (what a person reads). `config.py` holds AuditConfig; `metrics.py`
(certificates, latency statistics), `timing.py` (adaptive rounds), `engine.py` (the engine folder and its
N:M weights) and `evaluate.py` (running both engines, per-layer sensitivity) hold the parts.
"""

"""The audit stage: the sparse engine against its dense twin, measured in one run -> `audit/` artifact.

`stage.py` runs it, one step after another: `subject.py` (open the engine, its weights source and the
evaluation data), `accuracy.py` (both engines over the images, the PyTorch reference), the timing in
`stage.py` itself, `verdict.py` (the N:M weight check, the gates, the caveats), `result.py` (audit.json),
`plots.py` and `markdown.py` (what a person reads). `config.py` holds AuditConfig; `metrics.py`
(certificates, latency statistics), `timing.py` (adaptive rounds), `engine.py` (the engine folder and its
N:M weights) and `evaluate.py` (running both engines, per-layer sensitivity) hold the parts.
"""

from mpdeploy.audit.common import SCHEMA
from mpdeploy.audit.engine import check_engine_weights
from mpdeploy.audit.evaluate import accuracy_metrics, layer_sensitivity
from mpdeploy.audit.metrics import (
    certified_mask,
    dense_margins,
    labels_fit,
    latency_stats,
    logit_distance,
    measure_latency,
    topk_correct,
)
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.stage import audit, read_audit, verdict_line

__all__ = [
    "SCHEMA", "AuditConfig", "audit", "read_audit", "verdict_line", "certified_mask", "dense_margins",
    "labels_fit", "latency_stats", "logit_distance", "measure_latency", "topk_correct", "accuracy_metrics",
    "layer_sensitivity", "check_engine_weights",
]

"""audit.json (schema mpdeploy.audit/1): the record of one audit, built from what its steps measured."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpdeploy.core import artifacts
from mpdeploy.core.kinds import EngineFolder

from mpdeploy.audit.accuracy import AccuracyRun
from mpdeploy.audit.common import SCHEMA, Findings, pattern_text
from mpdeploy.audit.config import AuditConfig, reuse_config
from mpdeploy.audit.subject import AuditSubject
from mpdeploy.audit.timing import TimingPolicy, method_record

if TYPE_CHECKING:
    from mpdeploy.models.data import ImageData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyRun:
    """The timing step's statistics per batch size, and the machine's load around it."""

    by_batch: dict[int, dict[str, Any]]  # batch size -> measure_latency's record; untimeable ones missing
    load_before: list[float] | None
    load_after: list[float] | None
    policies: dict[int, TimingPolicy]


@dataclass(frozen=True)
class EngineRun:
    """Everything measured while both engines were loaded."""

    runtime: dict[str, Any]  # the backend's device_info()
    host: dict[str, Any]
    accuracy: AccuracyRun
    latency: LatencyRun
    reference: dict[str, Any] | None  # the engines against the PyTorch model of their weights source


def audit_summary(subject: AuditSubject, run: EngineRun, weights: Mapping[str, Any] | None,
                  accuracy_gate: Mapping[str, Any]) -> dict[str, Any]:
    """audit.json's `summary`: the headline numbers (the report table and the terminal line read these)."""
    pruned = subject.pruned or {}
    totals = pruned.get("totals") or {}
    pconf = pruned.get("pruned_with") or pruned.get("config") or {}  # a distilled artifact's prune config
    accuracy = run.accuracy.metrics
    latency = {str(b): v for b, v in sorted(run.latency.by_batch.items())}
    return {
        "model": (pruned.get("model") or {}).get("name") or subject.root.name,
        "pattern": pattern_text(subject.layers),
        "budget": pconf.get("budget"),
        "saliency": pconf.get("saliency"),
        "mac_reduction": totals.get("mac_reduction"),
        "sparse_execution_mac_reduction": totals.get("sparse_execution_mac_reduction"),
        "labels_meaningful": run.accuracy.labels_ok,
        "eval_images": int(len(run.accuracy.labels)),
        "accuracy_gate": accuracy_gate["metric"],
        **{k: (accuracy or {}).get(k) for k in (
            "top1_dense", "top1_sparse", "top1_drop", "top1_drop_stderr", "top5_dense", "top5_sparse", "top5_drop",
            "agreement", "certified_fraction", "max_logit_error", "mean_logit_error")},
        "speedup_p50": {b: v["ratio_p50"] for b, v in latency.items()},
        "speedup_spread_p10_p90": {b: [v["ratio_spread"]["p10"], v["ratio_spread"]["p90"]] for b, v in latency.items()},
        "weights_nm_compliant": None if weights is None else not weights["violations"],
    }


def audit_record(config: AuditConfig, subject: AuditSubject, data: ImageData, run: EngineRun, findings: Findings, *,
                 weights: dict[str, Any] | None, sensitivity: Mapping[str, Any] | None,
                 accuracy_gate: dict[str, Any], speed_gate: dict[str, Any] | None,
                 started: str, timings: dict[str, float]) -> dict[str, Any]:
    """The whole audit.json but `plots` and `seconds`, which the writer fills in; `timings` is shared with
    the caller's stopwatch, whose last lap (the plots) lands in it before the file is written."""
    engine_dir, precision = subject.engine_dir, subject.precision
    labels_ok, labels_why = run.accuracy.labels_ok, run.accuracy.labels_why
    images = int(len(run.accuracy.labels))
    latency = run.latency
    return {
        "schema": SCHEMA,
        "backend": subject.backend,
        "passed": not findings.failures,
        "failures": findings.failures,
        "warnings": findings.warnings,
        "summary": audit_summary(subject, run, weights, accuracy_gate),
        "device": {"engine_manifest": subject.manifest.get("device"), "runtime": run.runtime, "host": run.host,
                   "precision": precision, "loadavg_before_timing": latency.load_before,
                   "loadavg_after_timing": latency.load_after},
        "data": {"source": config.data, "kind": data.kind, "description": data.description,
                 "classes": data.num_classes, "images": images, "split": "test",
                 "labels_meaningful": labels_ok, "labels_note": labels_why},
        "latency": {str(b): v for b, v in sorted(latency.by_batch.items())},
        "latency_method": {
            "warmup_calls": config.warmup, "rounds": config.repeats, "calls_per_round": config.calls_per_round,
            "order": "interleaved; dense first in even rounds, sparse first in odd rounds",
            "speedup": "dense p50 / sparse p50 (>1: sparse faster); spread = percentiles of per-round ratios",
            "throughput": "batch / mean call time",
            "timer": "Runner.time(): per call, device-synchronized, input already on the device",
            **method_record(config, latency.policies),
        },
        "accuracy": run.accuracy.metrics,
        "engine_vs_pytorch": run.reference,
        "weights": weights,
        "sensitivity": sensitivity["layers"] if sensitivity else [],
        "sensitivity_summary": {k: v for k, v in sensitivity.items() if k != "layers"} if sensitivity else None,
        "thresholds": {"max_top1_drop": config.max_top1_drop, "min_speedup": config.min_speedup,
                       "accuracy_gate": accuracy_gate, "speed_gate": speed_gate},
        "engine": {"folder": engine_dir.name, "files": {k: v.name for k, v in subject.files.items()},
                   "precision": precision, "manifest_sha256": artifacts.manifest_hash(engine_dir),
                   "build_report": EngineFolder.REPORT if (engine_dir / EngineFolder.REPORT).is_file() else None},
        "config": reuse_config(config),  # the placement is under device.host
        "started": started,
        "seconds": None,
        "timings": timings,
    }

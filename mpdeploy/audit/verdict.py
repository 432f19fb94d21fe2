"""What decides the verdict besides the engines' outputs: the N:M weights inside the engine, the accuracy
and speed gates; and the caveats a reader needs to weigh the numbers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpdeploy.audit.accuracy import AccuracyRun
from mpdeploy.audit.common import Findings, cpu_only, fmt_pct
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.engine import check_engine_weights, onnx_for_weights
from mpdeploy.audit.result import EngineRun
from mpdeploy.audit.subject import AuditSubject
from mpdeploy.core.names import traits

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95  # the ratio interval's level when its record does not say (audit/timing.py)


def check_weights(subject: AuditSubject, findings: Findings) -> dict[str, Any]:
    """Every pruned layer N:M in the sparse engine's weights (its ONNX, or the ONNX it was built from)."""
    from safetensors.numpy import load_file

    onnx_path, onnx_note = onnx_for_weights(subject.engine, subject.files["sparse"])
    masks = {k: v.astype(bool) for k, v in load_file(str(subject.weights.masks_file)).items()}
    weights = check_engine_weights(onnx_path, subject.layers, masks)
    weights["note"] = onnx_note
    bad = weights["violations"]
    if bad:
        root = subject.root
        findings.failures.append(
            f"{len(bad)} of {weights['checked']} pruned layers are not N:M-compliant in "
            f"{onnx_path.relative_to(root) if onnx_path.is_relative_to(root) else onnx_path} "
            f"(e.g. {bad[0]['layer']}: {bad[0]['problem']})"
        )
    return weights


def accuracy_gate(config: AuditConfig, accuracy: AccuracyRun, findings: Findings) -> dict[str, Any]:
    """Top-1 drop at most max_top1_drop; when the labels do not fit the model, top-1 disagreement with
    dense takes its place (it bounds any top-1 drop)."""
    metrics = accuracy.metrics
    if metrics is None:
        return {"metric": None, "value": None, "max": config.max_top1_drop}
    if accuracy.labels_ok:
        gate = {"metric": "top1_drop", "value": metrics["top1_drop"], "max": config.max_top1_drop}
        if metrics["top1_drop"] > config.max_top1_drop + 1e-12:
            findings.failures.append(
                f"top-1 drop {100 * metrics['top1_drop']:.2f} pts > {100 * config.max_top1_drop:.2f} "
                f"pts ({fmt_pct(metrics['top1_dense'], 2)} -> {fmt_pct(metrics['top1_sparse'], 2)})")
        return gate
    disagreement = 1.0 - metrics["agreement"]
    gate = {"metric": "top1_disagreement", "value": disagreement, "max": config.max_top1_drop}
    if disagreement > config.max_top1_drop + 1e-12:
        findings.failures.append(f"top-1 disagreement with dense {100 * disagreement:.2f} pts > "
                                 f"{100 * config.max_top1_drop:.2f} pts (labels not usable: {accuracy.labels_why})")
    return gate


def has_sparse_kernels(backend: str | None, runtime: Mapping[str, Any] | None) -> bool:
    """Can this backend run 2:4 on sparse tensor cores? TensorRT and torch (GPU only) can; ONNX Runtime only
    through its TensorRT execution provider (its CPU and CUDA providers have no sparse kernels)."""
    return traits(backend).runs_sparse(runtime)


def speed_gate(config: AuditConfig, latency: Mapping[int, Mapping[str, Any]], findings: Findings,
               backend: str | None = None, runtime: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The speed verdict at the largest timed batch (dense p50 / sparse p50; > 1: sparse faster).

    Where the backend has sparse kernels (speed is the point of the sparse engine): measurably slower
    (the ratio's interval entirely below 1.0) fails, no measurable speedup (the interval holds 1.0) warns
    with the advice to ship the dense engine. Without sparse kernels (ONNX Runtime on CPU) no speed claim
    is made. `min_speedup`, when set, is a stricter gate on every backend."""
    if not latency:
        if config.min_speedup is not None:
            findings.failures.append("no batch size could be timed, so the speed gate cannot pass")
        return None
    largest = max(latency)
    ratio = latency[largest]["ratio_p50"]
    interval = latency[largest].get("ratio_interval") or {}
    low, high = interval.get("low"), interval.get("high")
    kernels = backend is None or has_sparse_kernels(backend, runtime)
    gate = {"batch": largest, "speedup_p50": ratio, "min": config.min_speedup, "interval": [low, high],
            "sparse_kernels": kernels if backend is not None else None, "fail_if_slower": config.fail_if_slower}
    if backend is not None and not kernels and not cpu_only(backend, runtime or {}):
        findings.warnings.append(f"{backend}: this execution provider has no 2:4 sparse kernels (only ONNX Runtime's "
                                 "TensorRT provider has): the sparse engine runs dense math, no speed claim is made")
    if backend is not None:
        level = interval.get("confidence") or CONFIDENCE
        shown = (f"{ratio:.3f}x, {100 * level:.0f}% interval [{low:.3f}, {high:.3f}]"
                 if low is not None and high is not None else f"{ratio:.3f}x, no interval")
        gate["verdict"] = _speed_verdict(config, largest, shown, low, high, kernels, findings)
    if config.min_speedup is not None and not ratio >= config.min_speedup:
        findings.failures.append(f"speedup at batch {largest} is {ratio:.3f}x < required {config.min_speedup:g}x")
    return gate


def _speed_verdict(config: AuditConfig, batch: int, shown: str, low: float | None, high: float | None,
                   kernels: bool, findings: Findings) -> str:
    """"slower" (a failure) | "no measurable speedup" (a warning) | "faster" | "no speed claim"."""
    if not kernels:
        return "no speed claim: this backend has no sparse kernels, the sparse engine runs dense math"
    if high is not None and high < 1.0:
        message = (f"the sparse engine is measurably slower than its dense twin at batch {batch} ({shown}, "
                   "entirely below 1.0): ship the dense engine, or densify the layers that ran dense and rebuild")
        (findings.failures if config.fail_if_slower else findings.warnings).append(message)
        return "slower"
    if low is None or high is None or low <= 1.0:
        findings.warnings.append(f"no speedup is measurable at batch {batch} ({shown}, holds 1.0): the sparse "
                                 "engine buys no speed here; ship the dense engine unless a later measurement "
                                 "shows a gain")
        return "no measurable speedup"
    return "faster"


def caveats(subject: AuditSubject, run: EngineRun, sensitivity: Mapping[str, Any] | None) -> list[str]:
    """Warnings about what the numbers mean here: no sparse kernels, a busy machine, few images, ..."""
    warnings = []
    backend, runtime, latency = subject.backend, run.runtime, run.latency.by_batch
    if cpu_only(backend, runtime):
        warnings.append("ONNX Runtime's CPU provider has no 2:4 sparse kernels: it multiplies the zeros like any "
                        "other weight, so a speedup near 1.0x is expected here and no speed claim is made; it shows "
                        "the sparse engine costs nothing extra, not what sparse tensor cores would give")
    audit_only = sorted({r["pattern"] for r in subject.layers if r.get("pattern") and not r.get("runs_sparse")})
    if audit_only:
        warnings.append(f"layers pruned to {', '.join(audit_only)} have no sparse-tensor-core path: they run dense "
                        "on every backend; their MAC reduction is accounting only")
    cores = run.host.get("cpu_count") or 1
    busiest = max((run.latency.load_before or [0])[0], (run.latency.load_after or [0])[0])
    if busiest > cores:
        warnings.append(f"the machine was busy while timing (load average {busiest:.1f} on {cores} cores): "
                        "latency is noisy; interleaving keeps the ratio fair, but re-run on an idle machine")
    if latency and min(latency) <= 2 and latency[min(latency)]["ratio_p50"] < 0.95 and not cpu_only(backend, runtime):
        warnings.append("the sparse engine is slower at the smallest batch: tiny batches often are with sparse kernels")
    rho = (sensitivity or {}).get("spearman_signal_vs_effect")
    if rho is not None and rho > 0.3 and len(sensitivity["layers"]) >= 5:
        worst = sorted(sensitivity["layers"], key=lambda r: -r["logit_effect"])[:2]
        median = float(np.median([r["signal"] for r in sensitivity["layers"] if r["signal"] is not None]))
        named = ", ".join(f"{r['layer']} (signal {r['signal']:.2f})" for r in worst if r["signal"] is not None)
        warnings.append(
            f"the MP signal runs with the measured sensitivity here (Spearman {rho:+.2f}; the budget assumes higher "
            f"signal = safer): the most sensitive layers are {named}, the median signal is {median:.2f}; the mp "
            "budget may be pruning the wrong layers of this model: compare with --budget uniform"
        )
    accuracy = run.accuracy.metrics
    if accuracy is not None and accuracy["images"] < 200:
        warnings.append(f"only {accuracy['images']} evaluation images: one image is "
                        f"{100 / accuracy['images']:.2f} pts of top-1")
    return warnings

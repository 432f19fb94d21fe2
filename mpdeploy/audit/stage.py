"""The audit stage: the sparse engine against its dense twin, measured in one run -> `audit/` artifact.

    engines/<name>/audit/
      audit.json        schema mpdeploy.audit/1: verdict, failures, summary, latency, accuracy, sensitivity
      audit.md          the report a person reads (headline verdict, tables, the plots, caveats)
      latency.png       p50 per batch size, p10-p90 error bars, speedup per batch with its spread
      accuracy.png      top-1 / top-5 / agreement / certified fraction
      certified.png     dense margin m against 2x the logit perturbation d, per sample (log scale)
      sensitivity.png   per-layer logit effect of pruning that layer alone vs its MP signal
      manifest.json     the usual artifact manifest

What is measured:
- latency: both engines loaded on one backend in one process; each warmed up, then `repeats`
  interleaved rounds per batch size (A B, B A, A B, ...: who goes first alternates so slow drift in
  clocks or machine load hits both alike). Per-call milliseconds give p50/p90/p99; speedup =
  dense p50 / sparse p50; its spread is the p10..p90 (and IQR) of the per-round ratios.
- accuracy: both engines on the same evaluation images: top-1 / top-5 against labels (when the labels
  fit the model), top-1 agreement sparse vs dense, logit error, and the certified fraction
  (docs/method.md section 6: a sample is certified when its dense margin m = z1 - z2 exceeds 2 d,
  d = ||z_sparse - z_dense||_inf; then no perturbation of that size can change its top-1).
- per-layer sensitivity (PyTorch, CPU): the dense model with ONE layer's mask applied; effect =
  mean over samples of ||z - z_dense||_inf, plus relative L2 and the top-1 flip rate.
- the engine's sparse weights: every pruned layer's weight found in the engine's ONNX is N:M along
  its reduction axis (and 2:4 where the pattern is meant to run on sparse tensor cores).

Gates: top-1 drop > max_top1_drop fails (when the labels do not fit the model, the top-1
disagreement with dense takes its place: it bounds any top-1 drop); an INT8 / FP16 engine's top-1 drop
against the fp32 dense PyTorch model above max_top1_drop fails too (audit/fp32_reference.py: both
engines share the precision, so their own comparison cannot see what quantization lost); a speedup at the largest batch
below min_speedup fails (if set); a pruned weight that is not N:M in the engine, or outputs of the
wrong shape or with NaN/Inf, fail.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpdeploy.core import artifacts, atomic
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import AuditFolder, EngineFolder

from mpdeploy.audit.accuracy import AccuracyRun, check_reference, compare_with_pytorch, measure_accuracy
from mpdeploy.audit.common import AUDIT_DIR, KIND, Findings, Progress, fmt_pct, host_info, loadavg
from mpdeploy.audit.config import AuditConfig, reuse_config
from mpdeploy.audit.engine import check_root
from mpdeploy.audit.evaluate import layer_sensitivity
from mpdeploy.audit.fp32_reference import fp32_gate
from mpdeploy.audit.markdown import render_markdown
from mpdeploy.audit.metrics import measure_latency
from mpdeploy.audit.plots import write_plots
from mpdeploy.audit.result import EngineRun, LatencyRun, audit_record
from mpdeploy.audit.subject import AuditSubject, load_eval_data, open_subject, timed_batch_sizes
from mpdeploy.audit.timing import policies_for, sensitivity_budget
from mpdeploy.audit.verdict import accuracy_gate, caveats, check_weights, speed_gate
from mpdeploy.core.progress import progress_log

if TYPE_CHECKING:
    from mpdeploy.models.data import ImageData

__all__ = ["AuditConfig", "audit", "audit_inputs", "audit_sources", "read_audit", "verdict_line"]

logger = logging.getLogger(__name__)

def audit_sources(engine: EngineFolder) -> dict[str, Path]:
    """What an audit of `engine` is made from: the engine and the exact weights it was built from."""
    return {"engine": engine.path, "weights": engine.required_source("weights")}


def audit_inputs(engine: EngineFolder) -> dict[str, str]:
    """The audit's reuse inputs: the engine's manifest hash and its weights'."""
    return {"engine_manifest": artifacts.manifest_hash(engine.path),
            "pruned_manifest": artifacts.manifest_hash(engine.required_source("weights"))}


class _Stopwatch:
    """Seconds per audit step (audit.json's `timings`) and in all."""

    def __init__(self) -> None:
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def audit(engine_root: Path, config: AuditConfig, progress: Progress | None = None, runtime=None) -> Path:
    """Audit `engine_root/engine-<backend>/` (sparse vs dense) and write `engine_root/audit/`. Returns its path.

    The engine is opened verified with its chain; the PyTorch reference, the weight check and the
    per-layer sensitivity use the weights the engine records as its source (distilled or pruned).
    `runtime` (a BuildConfig) overrides the run-time options recorded with the engine (threads)."""
    engine_root = Path(engine_root)
    check_root(engine_root)
    step = progress_log(progress, "audit")
    clock = _Stopwatch()
    subject = open_subject(engine_root, config.backend)
    findings = Findings()
    data = load_eval_data(config, subject, findings)
    clock.lap("read_inputs_s")

    run = _run_engines(config, subject, data, findings, clock, step, getattr(runtime, "threads", None))
    check_reference(subject, run.reference, findings)
    clock.lap("pytorch_reference_s")
    weights = check_weights(subject, findings)
    clock.lap("weights_check_s")
    sensitivity = _sensitivity_map(config, subject, run.accuracy, step)
    clock.lap("sensitivity_s")

    gate = accuracy_gate(config, run.accuracy, findings)
    fp32 = fp32_gate(config, subject, data, run.accuracy, findings)  # INT8 / FP16 engines only
    clock.lap("fp32_gate_s")
    speed = speed_gate(config, run.latency.by_batch, findings, subject.backend, run.runtime)
    findings.warnings += caveats(subject, run, sensitivity)
    result = audit_record(config, subject, data, run, findings, weights=weights, sensitivity=sensitivity,
                          accuracy_gate=gate, speed_gate=speed, started=clock.started.isoformat(timespec="seconds"),
                          timings=clock.timings)
    result["thresholds"]["fp32_gate"] = fp32
    out = _write_audit(config, subject, result, run.accuracy, clock, step)
    logger.info("audit of %s: %s -> %s", engine_root, "PASS" if not findings.failures else "FAIL", out)
    return out


# ---------------------------------------------------------------------------------------------------
# the engines' session: kept in this module so its log lines (a batch that cannot be timed, a runner
# that does not close) keep their logger name, mpdeploy.audit.stage


def _run_engines(config: AuditConfig, subject: AuditSubject, data: ImageData, findings: Findings, clock: _Stopwatch,
                 step: Progress, threads: int | None) -> EngineRun:
    """Load both engines on one backend, measure accuracy, latency and the PyTorch reference, close them."""
    from mpdeploy.backends.base import create_backend, engine_load_config

    backend = create_backend(subject.backend)
    runner_config = engine_load_config(subject.manifest, config.batch_sizes, threads)
    runners: dict[str, Any] = {}
    try:
        _load_runners(backend, subject, runner_config, runners)
        runtime = dict(backend.device_info() or {})
        host = host_info(config.placement)
        batch_sizes = timed_batch_sizes(config, subject, findings)
        clock.lap("load_engines_s")
        accuracy = measure_accuracy(config, subject, data, runners, batch_sizes, findings, step)
        clock.lap("accuracy_s")
        latency = _time_engines(config, runners, batch_sizes, accuracy.head, findings, step)
        clock.lap("latency_s")
        reference = compare_with_pytorch(config, subject, accuracy, findings)
    finally:
        _close_runners(runners)
    return EngineRun(runtime=runtime, host=host, accuracy=accuracy, latency=latency, reference=reference)


def _load_runners(backend, subject: AuditSubject, runner_config, runners: dict[str, Any]) -> None:
    """Load the dense, then the sparse engine into `runners`, so the caller closes whichever did load."""
    for variant in ("dense", "sparse"):
        try:
            runners[variant] = backend.load(subject.files[variant], runner_config)
        except MpdeployError:
            raise
        except Exception as exc:  # a corrupt engine file the manifest was made to match: one line
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise MpdeployError(f"{subject.files[variant]} cannot be loaded by {subject.backend} "
                                f"({type(exc).__name__}: {first}); the engine file is corrupt: rebuild it with "
                                "mpdeploy engine or mpdeploy build --force") from None


def _close_runners(runners: Mapping[str, Any]) -> None:
    for r in runners.values():
        try:
            r.close()
        except Exception as exc:  # closing must not hide the audit's own result
            logger.debug("closing a runner failed: %s", exc)


def _time_engines(config: AuditConfig, runners: Mapping[str, Any], batch_sizes: list[int], head: np.ndarray,
                  findings: Findings, step: Progress) -> LatencyRun:
    """Interleaved timing per batch size, on the first evaluation images repeated to fill the batch."""
    inputs = {}
    for b in batch_sizes:
        reps = math.ceil(b / len(head))
        inputs[b] = np.ascontiguousarray(np.concatenate([head] * reps)[:b])
    load_before = loadavg()
    by_batch: dict[int, dict[str, Any]] = {}
    policies = policies_for(config, list(inputs))
    for b, xb in inputs.items():
        try:
            by_batch.update(measure_latency(runners, {b: xb}, config.warmup, config.repeats,
                                            config.calls_per_round, step, policies=policies))
        except Exception as exc:  # an engine outside its optimization profile: report, keep going
            logger.warning("batch %d could not be timed: %s", b, exc)
            findings.failures.append(f"batch {b}: an engine failed to run ({type(exc).__name__}: {str(exc)[:160]})")
    load_after = loadavg()
    return LatencyRun(by_batch=by_batch, load_before=load_before, load_after=load_after, policies=policies)


def _sensitivity_map(config: AuditConfig, subject: AuditSubject, accuracy: AccuracyRun,
                     step: Progress) -> dict[str, Any] | None:
    """Per-layer sensitivity in PyTorch, when there is a weights source and it was not switched off."""
    if not config.sensitivity or config.sensitivity_batch <= 0:
        return None
    return layer_sensitivity(subject.pruned_dir, accuracy.head[: config.sensitivity_batch], subject.layers,
                             config.sensitivity_max_layers, sensitivity_budget(config), step)


def _write_audit(config: AuditConfig, subject: AuditSubject, result: dict[str, Any], accuracy: AccuracyRun,
                 clock: _Stopwatch, step: Progress) -> Path:
    """The plots, audit.json, audit.md and the manifest, written into `audit/` at once (atomic folder)."""
    out = subject.root / AUDIT_DIR
    with artifacts.atomic_dir(out, kind=KIND) as tmp:
        plots = []
        if config.plots:
            step("plots", 0, 1)
            plots = write_plots(result, accuracy.stream.samples() if accuracy.stream is not None else None, tmp)
            step("plots", 1, 1)
        result["plots"] = plots
        clock.lap("plots_s")
        result["seconds"] = clock.total()
        atomic.write_json(tmp / AuditFolder.RESULT, result)
        atomic.atomic_write_text(tmp / AuditFolder.MARKDOWN, render_markdown(result, subject.root))
        artifacts.write_manifest(tmp, KIND, reuse_config(config), inputs=audit_inputs(subject.engine),
                                 sources=audit_sources(subject.engine), target=out,
                                 extra={"backend": subject.backend, "passed": not result["failures"]})
    return out


def read_audit(engine_root: Path) -> dict[str, Any]:
    """The audit result of `engine_root`, opened verified: its files, and the engine and weights it audited
    unchanged since (a forged or stale audit is refused)."""
    return AuditFolder.open(Path(engine_root) / AUDIT_DIR).result()


def verdict_line(result: Mapping[str, Any], path: Path | str) -> str:
    """One line for the terminal: PASS/FAIL, the headline numbers, the path."""
    s = result["summary"]
    parts = ["PASS" if result["passed"] else "FAIL", str(path)]
    if s.get("top1_dense") is not None:
        parts.append(f"top-1 {fmt_pct(s['top1_dense'], 2)} -> {fmt_pct(s['top1_sparse'], 2)}")
    if s.get("agreement") is not None:
        parts.append(f"agreement {fmt_pct(s['agreement'])}, certified {fmt_pct(s['certified_fraction'])}")
    if s.get("speedup_p50"):
        parts.append("speedup " + " ".join(f"b{b} {v:.2f}x" for b, v in s["speedup_p50"].items()))
    parts.append(f"on {result['backend']}")
    return " | ".join(parts)

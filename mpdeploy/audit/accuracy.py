"""The accuracy step: both engines over the evaluation images; then the engines against the PyTorch
model of their weights source, on the first of those images."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mpdeploy.core.errors import MpdeployError

from mpdeploy.audit.common import FP32_REL_TOLERANCE, Findings, Progress
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.evaluate import StreamedAccuracy, eval_workers, image_batches, run_both, torch_reference
from mpdeploy.audit.metrics import labels_fit
from mpdeploy.audit.subject import AuditSubject
from mpdeploy.audit.timing import accuracy_budget

if TYPE_CHECKING:
    from mpdeploy.models.data import ImageData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyRun:
    """What the accuracy pass measured."""

    stream: StreamedAccuracy | None  # per-image numbers; None when an output had the wrong shape or NaN/Inf
    labels: np.ndarray  # of the evaluated images
    head: np.ndarray  # the first images: timing inputs, PyTorch reference, sensitivity map
    metrics: dict[str, Any] | None  # audit.json's `accuracy`
    labels_ok: bool  # do the labels fit the model (else the gate uses agreement with dense)
    labels_why: str


def measure_accuracy(config: AuditConfig, subject: AuditSubject, data: ImageData, runners: Mapping[str, Any],
                     batch_sizes: list[int], findings: Findings, progress: Progress) -> AccuracyRun:
    """Run both engines over `data` in batches of the largest timed size (or the engine's fixed batch)."""
    eval_batch = subject.fixed_batch or max(batch_sizes)
    keep = max(max(batch_sizes), config.sensitivity_batch, 8)
    try:
        stream, labels, head, run_failures = run_both(
            runners, image_batches(data.dataset, eval_batch, eval_workers(data.dataset, config.eval_workers)),
            subject.fixed_batch, subject.classes, keep,
            total=math.ceil(len(data) / eval_batch), progress=progress, budget_s=accuracy_budget(config))
    except MpdeployError:
        raise
    except Exception as exc:  # the runtime refused the input: say which and how to fix it
        raise MpdeployError(
            f"the {subject.backend} engines in {subject.engine_dir} could not run a batch of {eval_batch} images of "
            f"shape {list(subject.chw)} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
            "pass --batch-sizes within what the engine was built for, or rebuild it"
        ) from exc
    findings.failures += run_failures
    metrics: dict[str, Any] | None = None
    labels_ok, labels_why = False, "not evaluated"
    if stream is not None:
        dense_top1 = stream.dense_top1() if data.num_classes else None
        labels_ok, labels_why = labels_fit(data.kind, data.num_classes, stream.classes, dense_top1, len(labels))
        metrics = stream.metrics(labels_ok)
        if stream.stopped != "all images":
            findings.warnings.append(
                f"accuracy on {stream.count} of {len(data)} images (a seeded random sample): the time budget ran "
                "out; pass --time-budget 0 (or a larger one) to evaluate them all")
        metrics["labels_meaningful"], metrics["labels_note"] = labels_ok, labels_why
        if not labels_ok:
            findings.warnings.append(f"labels not used: {labels_why}; the accuracy gate uses top-1 agreement with "
                                     "the dense engine instead (disagreement bounds any top-1 drop)")
    return AccuracyRun(stream, labels, head, metrics, labels_ok, labels_why)


def compare_with_pytorch(config: AuditConfig, subject: AuditSubject, run: AccuracyRun,
                         findings: Findings) -> dict[str, Any] | None:
    """Max |engine - PyTorch| logits, per engine, on the first images; None without engine outputs."""
    reference = None
    if run.stream is not None:
        n_ref = min(len(run.head), max(config.sensitivity_batch, 8))
        try:
            ref = torch_reference(subject.pruned_dir, run.head[:n_ref])
            reference = {}
            for which in ("sparse", "dense"):
                err = float(np.abs(ref[which] - run.stream.head_logits(which)[:n_ref]).max())
                scale = float(np.abs(ref[which]).max()) or 1.0
                reference[which] = {"max_abs_diff": err, "relative": err / scale}
            reference["images"] = n_ref
            reference["weights"] = subject.pruned_dir.name  # the engine's recorded weights source
        except MpdeployError as exc:
            findings.warnings.append(f"PyTorch reference not computed: {exc}")
    return reference


def check_reference(subject: AuditSubject, reference: Mapping[str, Any] | None, findings: Findings) -> None:
    """Warn when an fp32 engine does not compute its weights source's function (reduced precision
    legitimately moves logits, so only fp32 is held to FP32_REL_TOLERANCE)."""
    if reference is None or subject.precision not in (None, "fp32"):
        return
    name = subject.pruned_dir.name
    for which in ("sparse", "dense"):
        if reference[which]["relative"] > FP32_REL_TOLERANCE:
            findings.warnings.append(
                f"the {which} engine differs from the PyTorch model of its weights source {name}/ by "
                f"{reference[which]['max_abs_diff']:.3g} (relative {reference[which]['relative']:.2g}) at fp32: it "
                f"may not have been built from this {name}/ artifact, its recorded weights source")

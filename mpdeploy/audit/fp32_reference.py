"""The fp32 gate: a reduced-precision (INT8 / FP16) engine against the fp32 model it was built from.

The accuracy gate compares the sparse engine with its dense twin, and both are built at the same
precision: an INT8 build that loses 17 points in both engines alike passes it. This gate compares the
sparse engine's predictions with those of the fp32 dense PyTorch model of its weights source (the model
the user brought, before pruning and quantization), on the same evaluation images in the same order:
the drop in top-1 against the labels, or, when the labels do not fit the fp32 model, the share of
images whose top-1 changed. It fails above the same max_top1_drop. fp32 engines skip it: the audit already
checks that they compute their weights source's function (the PyTorch reference check).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from mpdeploy.audit.accuracy import AccuracyRun
from mpdeploy.audit.common import Findings, fmt_pct
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.evaluate import eval_workers, image_batches
from mpdeploy.audit.metrics import labels_fit
from mpdeploy.audit.subject import AuditSubject
from mpdeploy.audit.timing import accuracy_budget

if TYPE_CHECKING:
    from mpdeploy.models.data import ImageData

logger = logging.getLogger(__name__)

BATCH = 64


def fp32_predictions(subject: AuditSubject, data: ImageData, count: int, budget_s: float | None,
                     clock=time.perf_counter) -> np.ndarray:
    """Top-1 of the fp32 dense PyTorch model on the first `count` evaluation images, in the order the
    engines saw them (the same seeded stream); stops early when `budget_s` is spent."""
    import torch

    from mpdeploy.sparsity.pruned import load_pruned

    model = load_pruned(subject.pruned_dir, which="dense", verify=False).model.float().eval()
    preds: list[np.ndarray] = []
    done, start = 0, clock()
    with torch.no_grad():
        for x, _ in image_batches(data.dataset, BATCH, eval_workers(data.dataset, None)):
            if done >= count or (budget_s is not None and done and clock() - start >= budget_s):
                break
            x = x[: count - done]
            preds.append(model(torch.as_tensor(x)).float().argmax(1).numpy())
            done += len(x)
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def fp32_gate(config: AuditConfig, subject: AuditSubject, data: ImageData, accuracy: AccuracyRun,
              findings: Findings) -> dict[str, Any] | None:
    """The sparse engine's top-1 drop (or disagreement) against the fp32 dense model; None for fp32 engines
    or without usable engine outputs."""
    if subject.precision in (None, "fp32") or accuracy.stream is None:
        return None
    stream = accuracy.stream
    fp32 = fp32_predictions(subject, data, stream.count, accuracy_budget(config))
    n = len(fp32)
    engine = stream.array("pred_sparse")[:n].astype(np.int64)
    record: dict[str, Any] = {"precision": subject.precision, "images": int(n), "max": config.max_top1_drop,
                              "reference": f"fp32 dense PyTorch model of {subject.pruned_dir.name}/"}
    if n == 0:
        findings.warnings.append("the fp32 gate measured no image")
        return {**record, "metric": None, "value": None}
    labels = np.asarray(accuracy.labels[:n])
    top1_fp32 = float((fp32 == labels).mean()) if data.num_classes else None
    # Whether the labels fit is the fp32 model's call: a broken INT8 dense engine at chance level made
    # the engines' own gate drop the labels, which must not soften this one.
    if accuracy.labels_ok or labels_fit(data.kind, data.num_classes, stream.classes or 0, top1_fp32, n)[0]:
        top1_engine = float((engine == labels).mean())
        record.update(metric="top1_drop_vs_fp32", value=top1_fp32 - top1_engine, top1_fp32=top1_fp32,
                      top1_engine=top1_engine)
        text = (f"top-1 drop against the fp32 dense model {100 * record['value']:.2f} pts "
                f"({fmt_pct(top1_fp32, 2)} -> {fmt_pct(top1_engine, 2)} at {subject.precision}, {n} images)")
    else:
        record.update(metric="top1_disagreement_vs_fp32", value=float((fp32 != engine).mean()))
        text = (f"top-1 disagreement with the fp32 dense model {100 * record['value']:.2f} pts at "
                f"{subject.precision} ({n} images; labels not usable)")
    if record["value"] > config.max_top1_drop + 1e-12:
        findings.failures.append(f"{text} > {100 * config.max_top1_drop:.2f} pts")
    logger.info("fp32 gate: %s", text)
    return record

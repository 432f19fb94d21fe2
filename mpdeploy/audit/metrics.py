"""Pure audit metrics: certificates, margins, top-k, whether labels fit, latency statistics."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


from mpdeploy.audit.common import CHANCE_SIGMAS, Progress

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# pure metrics


def certified_mask(dense_logits: np.ndarray, sparse_logits: np.ndarray) -> np.ndarray:
    """Per sample: dense top-1 margin m = z1 - z2 > 2 * ||z_sparse - z_dense||_inf.

    Any logit perturbation of inf-norm d moves the margin by at most 2 d, so a certified sample keeps
    its dense top-1 under the sparse engine. Ties (m = 0) are never certified.
    """
    dense = np.asarray(dense_logits, dtype=np.float64)
    sparse = np.asarray(sparse_logits, dtype=np.float64)
    if dense.shape != sparse.shape or dense.ndim != 2 or dense.shape[1] < 2:
        raise ValueError(f"need two [N, C>=2] logit arrays of one shape, got {dense.shape} and {sparse.shape}")
    return dense_margins(dense) > 2.0 * logit_distance(dense, sparse)


def dense_margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per sample."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def logit_distance(dense_logits: np.ndarray, sparse_logits: np.ndarray) -> np.ndarray:
    """||z_sparse - z_dense||_inf per sample."""
    return np.abs(np.asarray(sparse_logits, np.float64) - np.asarray(dense_logits, np.float64)).max(axis=1)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Bool per sample: the label is among the k largest logits."""
    top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def labels_fit(data_kind: str, data_classes: int | None, num_outputs: int, dense_top1: float | None,
               n: int) -> tuple[bool, str]:
    """Do the evaluation labels mean something for this model? (decides the accuracy gate)"""
    if data_kind == "synthetic":
        return False, "synthetic noise has no labels"
    if data_classes is None:
        return False, "the data carries no class labels"
    if data_classes != num_outputs:
        return False, f"the data has {data_classes} classes but the model has {num_outputs} outputs"
    chance = 1.0 / num_outputs
    threshold = chance + CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / max(n, 1))
    if dense_top1 is None or dense_top1 <= threshold:
        return False, (f"the dense engine's top-1 ({dense_top1:.1%}) is at chance level ({chance:.1%} for "
                       f"{num_outputs} classes): the labels do not fit this model (random init, or another task)")
    return True, f"{data_classes} classes; dense top-1 {dense_top1:.1%} is well above chance ({chance:.1%})"


def latency_stats(ms: Sequence[float], batch: int) -> dict[str, float]:
    arr = np.asarray(ms, dtype=np.float64)
    p10, p50, p90, p99 = np.percentile(arr, [10, 50, 90, 99])
    mean = float(arr.mean())
    return {
        "p50": float(p50), "p90": float(p90), "p99": float(p99), "p10": float(p10), "mean": mean,
        "min": float(arr.min()), "max": float(arr.max()), "samples": int(arr.size),
        # Sustained rate of back-to-back calls (mean, not p50: the slow calls cost time too).
        "throughput_img_s": float(batch * 1000.0 / mean) if mean > 0 else float("inf"),
    }


def measure_latency(runners: Mapping[str, Any], inputs: Mapping[int, np.ndarray], warmup: int, repeats: int,
                    calls_per_round: int, progress: Progress | None = None) -> dict[int, dict[str, Any]]:
    """Interleaved timing of the "dense" and "sparse" runners, per batch size.

    Round r runs dense then sparse when r is even, sparse then dense when odd. Each engine is warmed
    up right before its batch size is timed (the previous batch size may have left other kernels hot).
    """
    out: dict[int, dict[str, Any]] = {}
    order = ("dense", "sparse")
    total = len(inputs) * repeats
    done = 0
    for batch, x in inputs.items():
        for name in order:
            if warmup:
                runners[name].time(x, warmup)
        samples: dict[str, list[float]] = {name: [] for name in order}
        rounds: list[float] = []
        for r in range(repeats):
            per_round = {}
            for name in order if r % 2 == 0 else order[::-1]:
                ms = [float(v) for v in runners[name].time(x, calls_per_round)]
                samples[name].extend(ms)
                per_round[name] = float(np.median(ms))
            rounds.append(per_round["dense"] / per_round["sparse"] if per_round["sparse"] > 0 else float("nan"))
            done += 1
            if progress:
                progress("latency", done, total)
        dense, sparse = latency_stats(samples["dense"], batch), latency_stats(samples["sparse"], batch)
        ratios = np.asarray(rounds)
        q = np.nanpercentile(ratios, [10, 25, 50, 75, 90])
        out[batch] = {
            "dense": dense,
            "sparse": sparse,
            # >1 means the sparse engine is faster.
            "ratio_p50": dense["p50"] / sparse["p50"] if sparse["p50"] > 0 else float("nan"),
            "ratio_spread": {"p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                             "p90": float(q[4]), "iqr": float(q[3] - q[1]), "rounds": len(rounds)},
            "round_ratios": [float(v) for v in ratios],
        }
    return out

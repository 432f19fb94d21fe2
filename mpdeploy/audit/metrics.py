"""Pure audit metrics: certificates, margins, top-k, whether labels fit, latency statistics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mpdeploy.audit.common import CHANCE_SIGMAS, Progress
from mpdeploy.audit.timing import TimingPolicy, time_batch

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
                    calls_per_round: int, progress: Progress | None = None,
                    policies: Mapping[int, TimingPolicy] | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[int, dict[str, Any]]:
    """Interleaved timing of the "dense" and "sparse" runners, per batch size.

    Round r runs dense then sparse when r is even, sparse then dense when odd. Each engine is warmed
    up right before its batch size is timed (the previous batch size may have left other kernels hot).
    Without `policies`: exactly `warmup` warm-up calls and `repeats` rounds; with a policy per batch
    size: adaptive (audit/timing.py), stopping on the ratio's interval, the time budget or max rounds.
    """
    out: dict[int, dict[str, Any]] = {}
    fixed = TimingPolicy(min_rounds=repeats, max_rounds=repeats, calls_per_round=calls_per_round, tolerance=None,
                         warmup_calls=warmup, adaptive_warmup=False)
    for batch, x in inputs.items():
        policy = (policies or {}).get(batch, fixed)

        def on_round(done: int, total: int, batch: int = batch) -> None:
            if progress:
                progress(f"latency b{batch}", done, total)

        timed = time_batch(runners, x, policy, clock=clock, on_round=on_round)
        out[batch] = latency_summary(timed, batch)
        logger.info("batch %d: speedup %.3fx [%.3f, %.3f] after %d rounds (%s)", batch, out[batch]["ratio_p50"],
                    timed["interval"]["low"], timed["interval"]["high"], len(timed["round_ratios"]), timed["stopped"])
    return out


def latency_summary(timed: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """Statistics of one batch size's timing run (timing.time_batch) for audit.json."""
    dense, sparse = latency_stats(timed["samples"]["dense"], batch), latency_stats(timed["samples"]["sparse"], batch)
    ratios = np.asarray(timed["round_ratios"])
    q = np.nanpercentile(ratios, [10, 25, 50, 75, 90])
    interval = timed["interval"]
    return {
        "dense": dense,
        "sparse": sparse,
        # >1 means the sparse engine is faster.
        "ratio_p50": dense["p50"] / sparse["p50"] if sparse["p50"] > 0 else float("nan"),
        "ratio_spread": {"p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                         "p90": float(q[4]), "iqr": float(q[3] - q[1]), "rounds": len(ratios)},
        # Geometric mean of per-round ratios with its t-interval (log scale), and why the rounds stopped.
        "ratio_interval": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in interval.items()},
        "stopped": timed["stopped"],
        "calls_per_round": timed["calls_per_round"],
        "warmup": timed["warmup"],
        "timing_seconds": round(float(timed["seconds"]), 3),
        "round_ratios": [float(v) for v in ratios],
    }

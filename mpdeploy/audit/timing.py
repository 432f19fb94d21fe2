"""Adaptive interleaved timing: rounds go on until the speed ratio is known well enough, or time runs out.

One round times `calls_per_round` calls of each engine, dense first in even rounds and sparse first in
odd ones (slow drift in clocks or load hits both alike). Its ratio is median(dense ms) / median(sparse
ms). The ratio's confidence interval is a t-interval on the log of the per-round ratios (ratios are
multiplicative; the log makes the interval symmetric in "x% faster / slower"). Timing stops when

- the interval's half-width, relative to its centre, is within `tolerance` (after `min_rounds`), or
- the batch's time budget is spent (after `min_rounds`), or
- `max_rounds` rounds are done.

The clock is injectable so tests can drive the loop with fake engines and a fake time source.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ORDER = ("dense", "sparse")
# Warm-up is over once the median of the last WARMUP_STABLE_CALLS calls is within WARMUP_STABLE of the
# median of the ones before.
WARMUP_STABLE_CALLS, WARMUP_STABLE = 3, 0.10

Clock = Callable[[], float]
RoundCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TimingPolicy:
    """When the interleaved rounds of one batch size stop."""

    min_rounds: int = 5
    max_rounds: int = 30
    calls_per_round: int = 3
    tolerance: float | None = 0.02  # relative half-width of the ratio's interval; None = never stop on it
    confidence: float = 0.95
    budget_s: float | None = None  # per batch size, warm-up included; None = no time bound
    warmup_calls: int = 10  # at most this many warm-up calls per engine
    adaptive_warmup: bool = True  # stop warming up once calls are stable, or on the warm-up share of the budget
    warmup_share: float = 0.2  # of `budget_s`, for both engines' warm-up together


def ratio_interval(round_ratios, confidence: float = 0.95) -> dict[str, float]:
    """Geometric-mean ratio and its t-interval from per-round ratios; half_width is relative to the centre."""
    logs = np.log(np.asarray([r for r in round_ratios if r > 0 and math.isfinite(r)], dtype=np.float64))
    n = logs.size
    if n == 0:
        return {"center": float("nan"), "low": float("nan"), "high": float("nan"), "half_width": float("inf"),
                "rounds": 0, "confidence": confidence}
    mean = float(logs.mean())
    if n < 2:
        half = float("inf")
    else:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.5 + confidence / 2, n - 1) * logs.std(ddof=1) / math.sqrt(n))
    center = math.exp(mean)
    low, high = (math.exp(mean - half), math.exp(mean + half)) if math.isfinite(half) else (0.0, float("inf"))
    # The larger of the two sides, as a fraction of the centre (exp is asymmetric: the upper side).
    return {"center": center, "low": low, "high": high, "half_width": high / center - 1.0 if math.isfinite(half)
            else float("inf"), "rounds": int(n), "confidence": confidence}


def warm_up(runner: Any, x: np.ndarray, policy: TimingPolicy, budget_s: float | None, clock: Clock) -> dict[str, Any]:
    """Warm one engine up: a fixed block of calls, or (adaptive) one call at a time until stable or out of time."""
    if policy.warmup_calls <= 0:
        return {"calls": 0, "stopped": "no warm-up", "last_ms": None}
    if not policy.adaptive_warmup:
        ms = [float(v) for v in runner.time(x, policy.warmup_calls)]
        return {"calls": policy.warmup_calls, "stopped": "fixed count", "last_ms": ms[-1] if ms else None}
    start, ms = clock(), []
    while True:
        ms.extend(float(v) for v in runner.time(x, 1))
        k = WARMUP_STABLE_CALLS
        # Warm when latency has stopped falling: the median of the last k calls is within WARMUP_STABLE
        # of the median of the k before (cold calls alike would fool a test on the last k alone).
        stopped = None
        if len(ms) >= 2 * k and abs(np.median(ms[-k:]) / np.median(ms[-2 * k:-k]) - 1) <= WARMUP_STABLE:
            stopped = "stable"
        elif len(ms) >= policy.warmup_calls:
            stopped = "max calls"
        elif budget_s is not None and clock() - start >= budget_s:
            stopped = "time budget"
        if stopped:
            return {"calls": len(ms), "stopped": stopped, "last_ms": ms[-1]}


def calls_per_round(policy: TimingPolicy, warmup: Mapping[str, Mapping[str, Any]], left_s: float | None) -> int:
    """Fewer calls per round (down to 1) when `min_rounds` rounds of slow calls would not fit the budget left:
    on a slow or busy machine the minimum rounds, not the budget, would otherwise set the audit's length."""
    call_ms = [w["last_ms"] for w in warmup.values() if w.get("last_ms")]
    if left_s is None or not call_ms:
        return policy.calls_per_round
    fit = int(max(left_s, 0.0) / (policy.min_rounds * sum(call_ms) / 1000.0))
    return max(1, min(policy.calls_per_round, fit))


def _stop_reason(rounds: int, interval: Mapping[str, float], elapsed: float, policy: TimingPolicy) -> str | None:
    if rounds >= policy.max_rounds:
        return "max rounds"
    if rounds < policy.min_rounds:
        return None
    if policy.tolerance is not None and interval["half_width"] <= policy.tolerance:
        return "tolerance"
    if policy.budget_s is not None and elapsed >= policy.budget_s:
        return "time budget"
    return None


def time_batch(runners: Mapping[str, Any], x: np.ndarray, policy: TimingPolicy, clock: Clock = time.perf_counter,
               on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Warm up both engines, then interleaved rounds until `policy` says stop. Raw samples and the interval."""
    start = clock()
    warm_budget = None if policy.budget_s is None else policy.budget_s * policy.warmup_share / len(ORDER)
    warmup = {name: warm_up(runners[name], x, policy, warm_budget, clock) for name in ORDER}
    left = None if policy.budget_s is None else policy.budget_s - (clock() - start)
    calls = calls_per_round(policy, warmup, left)
    samples: dict[str, list[float]] = {name: [] for name in ORDER}
    ratios: list[float] = []
    interval = ratio_interval([], policy.confidence)
    expected = policy.max_rounds
    while True:
        per_round = {}
        for name in ORDER if len(ratios) % 2 == 0 else ORDER[::-1]:
            ms = [float(v) for v in runners[name].time(x, calls)]
            samples[name].extend(ms)
            per_round[name] = float(np.median(ms))
        ratios.append(per_round["dense"] / per_round["sparse"] if per_round["sparse"] > 0 else float("nan"))
        interval = ratio_interval(ratios, policy.confidence)
        elapsed = clock() - start
        stopped = _stop_reason(len(ratios), interval, elapsed, policy)
        if policy.budget_s is not None and elapsed > 0:
            # Rounds the budget still allows, for the progress display's total.
            expected = min(policy.max_rounds, max(policy.min_rounds, round(len(ratios) * policy.budget_s / elapsed)))
        if on_round:
            on_round(len(ratios), len(ratios) if stopped else max(expected, len(ratios) + 1))
        if stopped:
            break
    return {"samples": samples, "round_ratios": ratios, "interval": interval, "stopped": stopped,
            "warmup": warmup, "calls_per_round": calls, "seconds": clock() - start}


def split_budget(total_s: float | None, batch_sizes, timing_share: float) -> dict[int, float | None]:
    """The timing part of the audit's budget, the same for every batch size (larger batches: fewer rounds)."""
    sizes = list(batch_sizes)
    if total_s is None or total_s <= 0 or not sizes:
        return {b: None for b in sizes}
    return {b: total_s * timing_share / len(sizes) for b in sizes}


# Shares of AuditConfig.time_budget_s: the accuracy pass (it stops early on a seeded random sample,
# and says so), the timing rounds (split over batch sizes) and the per-layer sensitivity map. The
# PyTorch reference, the weight check and the report are short and not budgeted.
ACCURACY_SHARE, TIMING_SHARE, SENSITIVITY_SHARE = 0.35, 0.45, 0.2


def policies_for(config: Any, batch_sizes) -> dict[int, TimingPolicy]:
    """One adaptive TimingPolicy per batch size from an AuditConfig."""
    budgets = split_budget(config.time_budget_s, batch_sizes, TIMING_SHARE)
    return {b: TimingPolicy(min_rounds=min(config.min_rounds, config.repeats), max_rounds=config.repeats,
                            calls_per_round=config.calls_per_round, tolerance=config.ratio_tolerance,
                            budget_s=budgets[b], warmup_calls=config.warmup) for b in batch_sizes}


def sensitivity_budget(config: Any) -> float | None:
    total = config.time_budget_s
    return None if total is None or total <= 0 else total * SENSITIVITY_SHARE


def accuracy_budget(config: Any) -> float | None:
    total = config.time_budget_s
    return None if total is None or total <= 0 else total * ACCURACY_SHARE


def method_record(config: Any, policies: dict[int, TimingPolicy]) -> dict[str, Any]:
    """How the rounds were run and when they stop, for audit.json's latency_method."""
    return {"adaptive": True, "min_rounds": min(config.min_rounds, config.repeats), "max_rounds": config.repeats,
            "ratio_tolerance": config.ratio_tolerance, "confidence": TimingPolicy.confidence,
            "time_budget_s": config.time_budget_s,
            "batch_budget_s": {str(b): p.budget_s for b, p in policies.items()},
            "interval": "t-interval on log(per-round dense median / sparse median); centre = geometric mean",
            "warmup": "up to warmup_calls per engine, one at a time, stopping once the median of the last 3 "
                      "calls is within 10% of the 3 before, or on 20% of the batch's budget"}

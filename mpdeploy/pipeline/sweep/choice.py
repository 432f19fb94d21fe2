"""The dense baseline, the Pareto front, the choice and why every other trial lost.

Per GPU kind (one column of the report; "cpu" without --gpu-kinds): the choice is the trial with the best
objective among those that finished and keep the top-1 drop within --max-top1-drop, the dense baseline
included (it always meets the budget: when no sparse trial beats it, the choice is to stay dense). A sparse
trial competes only when its speedup over its own dense twin is measurable (95% interval above 1.0). Where the
evaluation labels do not fit the model, the disagreement with the dense engine stands in for the drop (it
bounds any top-1 drop), as in the audit's gate.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from mpdeploy.pipeline.sweep.space import Objective

BASELINE = "dense"
CPU_KIND = "cpu"


def accuracy_drop(row: Mapping[str, Any]) -> float | None:
    """The top-1 drop, or the top-1 disagreement with dense where the labels do not fit the model."""
    if row.get("labels_meaningful") is False and isinstance(row.get("agreement"), (int, float)):
        return 1.0 - float(row["agreement"])
    drop = row.get("top1_drop")
    return float(drop) if isinstance(drop, (int, float)) else None


def objective_value(row: Mapping[str, Any], objective: Objective, variant: str = "sparse") -> float | None:
    stats = ((row.get("latency") or {}).get(str(objective.batch)) or {}).get(variant) or {}
    return objective.of(stats)


def kind_of(row: Mapping[str, Any]) -> str:
    return row.get("kind") or CPU_KIND


def baseline_rows(rows: Sequence[Mapping[str, Any]], objective: Objective) -> list[dict[str, Any]]:
    """One dense row per kind, from the dense twins the audits timed (fp32 audits when there are any): the
    median of their dense statistics, with the audits it came from."""
    out = []
    for kind in sorted({kind_of(r) for r in rows if r.get("status") == "ok" and r.get("phase") == "full"}):
        audited = [r for r in rows if r.get("status") == "ok" and r.get("phase") == "full" and kind_of(r) == kind]
        fp32 = [r for r in audited if r.get("precision") == "fp32"] or audited
        values = [v for v in (objective_value(r, objective, "dense") for r in fp32) if v is not None]
        top1 = [r["top1_dense"] for r in fp32 if isinstance(r.get("top1_dense"), (int, float))]
        latency = {}
        if values:
            latency[str(objective.batch)] = {"dense": {objective.stat: statistics.median(values)}}
        out.append({"id": f"{BASELINE}-{kind}", "config": {"dense": "baseline"}, "phase": "full", "status": "ok",
                    "kind": None if kind == CPU_KIND else kind, "backend": fp32[0].get("backend"),
                    "precision": fp32[0].get("precision"), "device": fp32[0].get("device"), "baseline": True,
                    "top1_sparse": statistics.median(top1) if top1 else None,
                    "top1_dense": statistics.median(top1) if top1 else None, "top1_drop": 0.0, "agreement": 1.0,
                    "mac_cut": 0.0, "labels_meaningful": fp32[0].get("labels_meaningful"),
                    "baseline_of": {"audits": [r["id"] for r in fp32], "statistic": "median of their dense twins"},
                    "latency": latency, "seconds": 0.0})
    return out


def _value(row: Mapping[str, Any], objective: Objective) -> float | None:
    return objective_value(row, objective, "dense" if row.get("baseline") else "sparse")


def pareto_front(rows: Sequence[Mapping[str, Any]], objective: Objective) -> list[str]:
    """Ids of the finished rows no other row beats on both the objective and top-1 (per kind)."""
    points = [(r["id"], kind_of(r), _value(r, objective), r.get("top1_sparse")) for r in rows
              if r.get("status") == "ok" and r.get("phase") == "full"]
    points = [p for p in points if p[2] is not None and isinstance(p[3], (int, float))]

    def dominates(a, b) -> bool:
        at_least = (not objective.better(b[2], a[2])) and a[3] >= b[3]
        strictly = objective.better(a[2], b[2]) or a[3] > b[3]
        return a[1] == b[1] and at_least and strictly

    return [p[0] for p in points if not any(dominates(q, p) for q in points if q is not p)]


def choose(rows: list[dict[str, Any]], objective: Objective, max_drop: float) -> dict[str, str | None]:
    """Pick the choice per kind and write each row's `verdict` (why it won or lost). Returns kind -> id."""
    choices: dict[str, str | None] = {}
    for kind in sorted({kind_of(r) for r in rows}):
        mine = [r for r in rows if kind_of(r) == kind]
        eligible = [r for r in mine if r.get("status") == "ok" and r.get("phase") == "full"
                    and _value(r, objective) is not None and (accuracy_drop(r) or 0.0) <= max_drop + 1e-12
                    and (r.get("baseline") or _measurably_faster(r, objective.batch))]
        best = None
        for r in eligible:
            if best is None or objective.better(_value(r, objective), _value(best, objective)):
                best = r
        choices[kind] = best["id"] if best else None
        for r in mine:
            r["verdict"] = _verdict(r, best, objective, max_drop)
    return choices


def _verdict(row: Mapping[str, Any], best: Mapping[str, Any] | None, objective: Objective, max_drop: float) -> str:
    if best is not None and row["id"] == best["id"]:
        if row.get("baseline"):
            return "chosen: no sparse trial within the accuracy budget beat the dense baseline"
        return f"chosen: the best {objective.label} within the accuracy budget"
    if row.get("status") == "failed":
        return f"failed: {row.get('reason')}"
    if row.get("status") == "not promoted":
        return f"not promoted: {row.get('reason')}"
    drop = accuracy_drop(row)
    if drop is None:
        return "no accuracy measured"
    if drop > max_drop + 1e-12:
        return f"over the accuracy budget: top-1 drop {drop:.2%} > {max_drop:.2%}"
    value = _value(row, objective)
    if value is None:
        return f"batch {objective.batch} was not timed: it cannot compete on {objective.label}"
    if not row.get("baseline") and not _measurably_faster(row, objective.batch):
        ci = _speedup_ci(row, objective.batch)
        shown = f"95% interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "no interval"
        return (f"not measurably faster than its dense twin at batch {objective.batch} ({shown}, not entirely "
                "above 1.0): sparsity does not pay here, so it is not shipped")
    if best is None:
        return "no choice"
    word = "lower throughput" if objective.mode == "max" else "slower"
    text = (f"{word}: {objective.label} {value:.4g} {objective.unit} against {_value(best, objective):.4g} "
            f"{objective.unit} ({best['id']})")
    if _overlap(row, best, objective.batch):
        text += "; within timing noise: their speedups over the dense twin have overlapping 95% intervals"
    return text


def _speedup_ci(row: Mapping[str, Any], batch: int) -> list[float] | None:
    """The 95% interval of dense p50 / sparse p50 at `batch`, timed interleaved against the trial's own twin."""
    got = ((row.get("latency") or {}).get(str(batch)) or {}).get("speedup_ci95") or []
    return got if len(got) == 2 and all(isinstance(v, (int, float)) for v in got) else None


def _measurably_faster(row: Mapping[str, Any], batch: int) -> bool:
    """A sparse engine is only a candidate when it beats its own dense twin beyond timing noise: an interval
    holding 1.0 is no measurable difference, and shipping it would be sparsity that does not pay."""
    ci = _speedup_ci(row, batch)
    return ci is not None and ci[0] > 1.0


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any], batch: int) -> bool:
    """Do two trials' speedup intervals (each timed interleaved against its own dense twin) overlap?"""
    x, y = _speedup_ci(a, batch), _speedup_ci(b, batch)
    return x is not None and y is not None and x[0] <= y[1] and y[0] <= x[1]


def promote(rows: Sequence[Mapping[str, Any]], k: int, max_drop: float) -> tuple[list[str], dict[str, str]]:
    """Successive halving's cut after the screen: the K trials most likely to be fast within the budget.

    Within the budget first, ordered by the MAC cut that runs sparse (the engine's speed comes from it), then
    by top-1; then the rest by top-1 drop. Returns (promoted ids, id -> why each other one was not)."""
    screened = [r for r in rows if r.get("status") == "ok"]

    def rank(r) -> tuple:
        drop = accuracy_drop(r)
        within = drop is not None and drop <= max_drop + 1e-12
        cut = r.get("sparse_execution_mac_cut") or r.get("mac_cut") or 0.0
        return (0, -cut, drop) if within else (1, drop if drop is not None else 1.0, -cut)

    ordered = sorted(screened, key=rank)
    promoted = [r["id"] for r in ordered[:k]]
    why = {}
    for place, r in enumerate(ordered[k:], start=k + 1):
        drop = accuracy_drop(r)
        why[r["id"]] = (f"screen rank {place} of {len(ordered)} (top-1 drop {drop:.2%}, MAC cut "
                        f"{(r.get('sparse_execution_mac_cut') or r.get('mac_cut') or 0):.1%}); --promote {k}")
    return promoted, why

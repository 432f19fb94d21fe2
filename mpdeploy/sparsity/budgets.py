"""Layerwise budgets: which layer gets which N:M pattern (or stays dense).

Budgets live in a registry (`register_budget`, timm `register_model` style); the CLI's choices come
from `list_budgets()`. Built in:

- `uniform`: the one pattern on every eligible layer (the baseline `mp` must beat).
- `mp` (Spectral Edge Budgeting, docs/method.md section 2): each layer's Marchenko-Pastur signal gives a
  weight w_l = max(0.1, 1 + beta * d(s) * z_l); a layer/pattern choice costs damage / w_l, where
  damage is the share of squared saliency the mask removes. Starting from all-dense, the cheapest
  MAC saving per unit cost is taken greedily until the global MAC-reduction target is met.
- `damage`: the same greedy walk with every w_l = 1 (damage alone, no MP signal).
- `sensitivity` / `mp-sensitivity`: the `damage` / `mp` walks with each option's damage measured on
  the outputs instead (relative squared logit error with that layer alone pruned, on calibration
  images; mpdeploy.sparsity.damage).

The target is a sparse-execution MAC reduction when any allowed pattern runs on 2:4 sparse tensor
cores (a layer is then either dense or 2:4-speed: 1:4 saves no more time than 2:4, so it is chosen
never for speed); with only audit-only patterns (e.g. 8:16) it counts kept-weight MACs.

The signal is the layer's bulk fraction (share of squared Frobenius mass below the fitted edge
sigma_+): it is what sigma_+ says about the layer, and unlike raw sigma_+ it is comparable across
layer shapes and weight scales. Larger = more bulk-like = prune more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM

logger = logging.getLogger(__name__)

# Fraction of the largest achievable MAC reduction the `mp` budget aims for when no target is given:
# it keeps the most damaging tenth of the prunable MACs dense.
DEFAULT_MP_TARGET_FRACTION = 0.9


def seb_schedule(sparsity: float) -> tuple[float, float]:
    """(beta, s_d) for overall sparsity s, from the paper's sweep (docs/method.md section 2)."""
    if sparsity <= 0.4:
        return 1.0, 0.5
    if sparsity <= 0.55:
        return 1.25, 0.7
    return 1.0, 0.85  # s > 0.55 (the paper uses beta 2 for MLP layers there; see seb_weight)


def seb_weight(z: float, sparsity: float, is_mlp: bool = False) -> float:
    beta, s_d = seb_schedule(sparsity)
    if sparsity > 0.55 and is_mlp:
        beta = 2.0
    d = max(0.0, 1.0 - sparsity / s_d)
    return max(0.1, 1.0 + beta * d * z)


def _signal_z(signals: list[float | None]) -> np.ndarray:
    """z-scores of the known signals; layers without one get z = 0 (the neutral weight w = 1)."""
    known = [s for s in signals if s is not None]
    z_known = iter(standardize(np.array(known)) if known else [])
    return np.array([0.0 if s is None else float(next(z_known)) for s in signals])


def standardize(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    std = values.std()
    return np.zeros_like(values) if std == 0 or not np.isfinite(std) else (values - values.mean()) / std


@dataclass(frozen=True)
class Candidate:
    """One layer with its options: (pattern, damage) pairs, densest first."""

    name: str
    macs: int
    signal: float | None  # None: no reliable MP signal (tiny matrix, failed fit) -> neutral weight
    options: tuple[tuple[NM, float], ...]
    is_mlp: bool = False


@dataclass(frozen=True)
class Assignment:
    pattern: NM | None  # None = dense
    weight: float  # w_l
    z: float
    cost: float


def assign_uniform(candidates: list[Candidate], pattern: NM) -> dict[str, Assignment]:
    out = {}
    for c in candidates:
        damage = dict(c.options).get(pattern)
        out[c.name] = Assignment(pattern if damage is not None else None, 1.0, 0.0, damage or 0.0)
    return out


def accounting(candidates: list[Candidate]) -> str:
    """"execution" (2:4-speed MACs) when any option runs sparse, else "kept" (kept-weight MACs)."""
    return "execution" if any(p.runs_sparse for c in candidates for p, _ in c.options) else "kept"


def _density(pattern: NM | None, kind: str) -> float:
    if pattern is None:
        return 1.0
    return pattern.execution_density if kind == "execution" else pattern.density


def assign_mp(candidates: list[Candidate], total_macs: int, target: float | None,
              use_signal: bool = True) -> tuple[dict[str, Assignment], float]:
    """Greedy MP-weighted assignment (all w_l = 1 without `use_signal`); returns (assignments, target
    used). The target and the gains are in the units `accounting` picks."""
    if not candidates:
        return {}, 0.0
    kind = accounting(candidates)
    max_saving = sum(c.macs * (1 - min(_density(p, kind) for p, _ in c.options)) for c in candidates if c.options)
    max_reduction = max_saving / total_macs
    if target is None:
        target = DEFAULT_MP_TARGET_FRACTION * max_reduction
    if not 0 < target < 1:
        raise MpdeployError(f"--target-mac-reduction must be between 0 and 1, got {target}")
    if target > max_reduction + 1e-9:
        raise MpdeployError(
            f"--target-mac-reduction {target:.3f} is more than the eligible layers can give ({max_reduction:.3f}) "
            "with these patterns; lower it or allow a sparser pattern"
        )
    z = _signal_z([c.signal for c in candidates]) if use_signal else np.zeros(len(candidates))
    weights = [seb_weight(float(zi), target, c.is_mlp) for zi, c in zip(z, candidates)]
    level = {c.name: -1 for c in candidates}  # index into options; -1 = dense
    saved = 0.0
    needed = target * total_macs
    while saved < needed - 1e-6:
        best = None
        for c, w in zip(candidates, weights):
            cur_density = 1.0 if level[c.name] < 0 else _density(c.options[level[c.name]][0], kind)
            cur_damage = 0.0 if level[c.name] < 0 else c.options[level[c.name]][1]
            # The next option that saves anything in these units (under execution accounting 1:4 after
            # 2:4 saves nothing, and 12:16 before 2:4 saves nothing either: skip over them).
            for nxt in range(level[c.name] + 1, len(c.options)):
                pattern, damage = c.options[nxt]
                gain = c.macs * (cur_density - _density(pattern, kind))
                if gain > 0:
                    ratio = (max(damage - cur_damage, 0.0) / w) / gain
                    if best is None or ratio < best[0]:
                        best = (ratio, c.name, gain, nxt)
                    break
        if best is None:
            break
        level[best[1]] = best[3]
        saved += best[2]
    _trim_overshoot(candidates, weights, level, saved, needed, kind)
    out = {}
    for c, w, zi in zip(candidates, weights, z):
        i = level[c.name]
        pattern, damage = (None, 0.0) if i < 0 else c.options[i]
        out[c.name] = Assignment(pattern, w, float(zi), damage / w)
    return out, float(target)


def _trim_overshoot(candidates: list[Candidate], weights: list[float], level: dict[str, int], saved: float,
                    needed: float, kind: str) -> None:
    """The walk stops on the step that crosses the target, which can overshoot it by up to one layer's
    saving (so budgets compared "at the same target" were not): hand back whole layers, the costliest
    per MAC saved first, whose saving the target does not need (in place on `level`)."""
    chosen = []
    for c, w in zip(candidates, weights):
        if level[c.name] < 0:
            continue
        pattern, damage = c.options[level[c.name]]
        saving = c.macs * (1 - _density(pattern, kind))
        if saving > 0:
            chosen.append(((damage / w) / saving, saving, c.name))
    for _, saving, name in sorted(chosen, reverse=True):
        if saved - saving >= needed - 1e-6:
            level[name] = -1
            saved -= saving


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

BudgetFn = Callable[[list[Candidate], int, "float | None", NM], "tuple[dict[str, Assignment], float | None]"]


@dataclass(frozen=True)
class BudgetSpec:
    name: str
    fn: BudgetFn  # (candidates, total MACs, target or None, main pattern) -> (assignments, target used)
    help: str
    # "weights": option damage = the saliency's removed share; "logits": measured on the outputs
    # (mpdeploy.sparsity.damage), which needs calibration data.
    damage: str = "weights"


_BUDGETS: dict[str, BudgetSpec] = {}


def register_budget(name: str, help: str = "", damage: str = "weights"):
    """Decorator: register fn(candidates, total_macs, target, pattern) -> (assignments, target)."""
    if damage not in ("weights", "logits"):
        raise ValueError(f"budget damage must be 'weights' or 'logits', not {damage!r}")

    def decorate(fn: BudgetFn) -> BudgetFn:
        if name in _BUDGETS:
            raise ValueError(f"budget {name!r} is already registered")
        _BUDGETS[name] = BudgetSpec(name, fn, help or (fn.__doc__ or "").strip(), damage)
        return fn
    return decorate


def list_budgets() -> tuple[str, ...]:
    return tuple(_BUDGETS)


def get_budget(name: str) -> BudgetSpec:
    if name not in _BUDGETS:
        raise MpdeployError(f"unknown budget {name!r}; choose one of {', '.join(_BUDGETS)}")
    return _BUDGETS[name]


@register_budget("uniform", help="the one pattern on every eligible layer")
def budget_uniform(candidates, total_macs, target, pattern):
    return assign_uniform(candidates, pattern), None


@register_budget("mp", help="greedy damage / MP-signal weight per MAC saved, to the MAC target")
def budget_mp(candidates, total_macs, target, pattern):
    return assign_mp(candidates, total_macs, target)


@register_budget("damage", help="greedy damage per MAC saved, to the MAC target (no MP signal)")
def budget_damage(candidates, total_macs, target, pattern):
    return assign_mp(candidates, total_macs, target, use_signal=False)


@register_budget("sensitivity", damage="logits",
                 help="greedy measured logit effect per MAC saved, to the MAC target (needs --calib)")
def budget_sensitivity(candidates, total_macs, target, pattern):
    return assign_mp(candidates, total_macs, target, use_signal=False)


@register_budget("mp-sensitivity", damage="logits",
                 help="greedy measured logit effect / MP-signal weight per MAC saved (needs --calib)")
def budget_mp_sensitivity(candidates, total_macs, target, pattern):
    return assign_mp(candidates, total_macs, target)

"""Layerwise budgets: which layer gets which N:M pattern (or stays dense).

- `uniform`: the one pattern on every eligible layer (the baseline `mp` must beat).
- `mp` (Spectral Edge Budgeting, method.md section 2): each layer's Marchenko-Pastur signal gives a
  weight w_l = max(0.1, 1 + beta * d(s) * z_l); a layer/pattern choice costs damage / w_l, where
  damage is the share of squared saliency the mask removes. Starting from all-dense, the cheapest
  MAC saving per unit cost is taken greedily until the global MAC-reduction target is met.

The signal is the layer's bulk fraction (share of squared Frobenius mass below the fitted edge
sigma_+): it is what sigma_+ says about the layer, and unlike raw sigma_+ it is comparable across
layer shapes and weight scales. Larger = more bulk-like = prune more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mpdeploy.errors import MpdeployError
from mpdeploy.patterns import NM

logger = logging.getLogger(__name__)

BUDGETS = ("uniform", "mp")
# Fraction of the largest achievable MAC reduction the `mp` budget aims for when no target is given:
# it keeps the most damaging tenth of the prunable MACs dense.
DEFAULT_MP_TARGET_FRACTION = 0.9


def seb_schedule(sparsity: float) -> tuple[float, float]:
    """(beta, s_d) for overall sparsity s, from the paper's sweep (method.md section 2)."""
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


def assign_mp(candidates: list[Candidate], total_macs: int, target: float | None) -> tuple[dict[str, Assignment], float]:
    """Greedy MP-weighted assignment; returns (assignments, target used)."""
    if not candidates:
        return {}, 0.0
    max_saving = sum(c.macs * (1 - min(p.density for p, _ in c.options)) for c in candidates if c.options)
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
    z = _signal_z([c.signal for c in candidates])
    weights = [seb_weight(float(zi), target, c.is_mlp) for zi, c in zip(z, candidates)]
    level = {c.name: -1 for c in candidates}  # index into options; -1 = dense
    saved = 0.0
    needed = target * total_macs
    while saved < needed - 1e-6:
        best = None
        for c, w in zip(candidates, weights):
            nxt = level[c.name] + 1
            if nxt >= len(c.options):
                continue
            cur_density = 1.0 if level[c.name] < 0 else c.options[level[c.name]][0].density
            cur_damage = 0.0 if level[c.name] < 0 else c.options[level[c.name]][1]
            pattern, damage = c.options[nxt]
            gain = c.macs * (cur_density - pattern.density)
            if gain <= 0:
                continue
            ratio = (max(damage - cur_damage, 0.0) / w) / gain
            if best is None or ratio < best[0]:
                best = (ratio, c.name, gain)
        if best is None:
            break
        level[best[1]] += 1
        saved += best[2]
    out = {}
    for c, w, zi in zip(candidates, weights, z):
        i = level[c.name]
        pattern, damage = (None, 0.0) if i < 0 else c.options[i]
        out[c.name] = Assignment(pattern, w, float(zi), damage / w)
    return out, float(target)


def seb_unstructured_masks(
    scores: dict[str, torch.Tensor], signals: dict[str, float], sparsity: float, mlp_names: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Global unstructured pruning (research mode): prune the smallest score/w_l to sparsity s.

    Below s = 0.2 the paper uses plain global magnitude; we do the same (all w_l = 1).
    """
    if not 0 < sparsity < 1:
        raise MpdeployError(f"--sparsity must be between 0 and 1, got {sparsity}")
    names = list(scores)
    z = _signal_z([signals.get(n) for n in names])
    mlp_names = mlp_names or set()
    weights = {
        n: (1.0 if sparsity < 0.2 else seb_weight(float(zi), sparsity, n in mlp_names)) for n, zi in zip(names, z)
    }
    flat = torch.cat([(scores[n] / weights[n]).flatten().float() for n in names])
    k = int(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(scores[n], dtype=torch.bool) for n in names}
    threshold = torch.kthvalue(flat, k).values
    return {n: (scores[n] / weights[n]) > threshold for n in names}

"""Saliency: which weights of an N:M group to keep.

- `magnitude`: |W|.
- `wanda`: |W_ij| * ||X_j||_2 over calibration inputs (Sun et al., 2023).
- `block-cost`: per group g, the keep-pattern m minimizing the output energy of what is removed,
  ((1-m).u)^T C_g ((1-m).u) with C_g = E[h_g h_g^T], searched exhaustively over all C(M, N)
  patterns (6 for 2:4, 924 for 6:12, 12870 for 8:16), chunked to bound memory.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from mpdeploy.errors import MpdeployError
from mpdeploy.patterns import NM, from_reduction_view, nm_mask_2d, reduction_view

SALIENCIES = ("magnitude", "wanda", "block-cost")
BLOCK_COST_CHUNK_BYTES = 256 << 20  # working memory per chunk of the exhaustive search


@dataclass
class InputStats:
    """Running statistics of one layer's reduction-aligned inputs X [rows, K]."""

    col_sq_sum: torch.Tensor | None = None  # [K]
    group_cov: dict[int, torch.Tensor] = field(default_factory=dict)  # M -> [K/M, M, M] sums of h_g h_g^T
    rows: int = 0

    def update(self, x2d: torch.Tensor, group_sizes: tuple[int, ...] = ()) -> None:
        x = x2d.double()
        sq = (x * x).sum(0)
        self.col_sq_sum = sq if self.col_sq_sum is None else self.col_sq_sum + sq
        for m in group_sizes:
            if x.shape[1] % m:
                continue
            g = x.reshape(x.shape[0], -1, m)
            cov = torch.einsum("rgi,rgj->gij", g, g)
            self.group_cov[m] = cov if m not in self.group_cov else self.group_cov[m] + cov
        self.rows += x.shape[0]

    @property
    def col_norm(self) -> torch.Tensor:
        if self.col_sq_sum is None:
            raise MpdeployError("no calibration inputs reached this layer; check --calib")
        return self.col_sq_sum.sqrt().float()


def check_saliency(name: str) -> str:
    if name not in SALIENCIES:
        raise MpdeployError(f"unknown saliency {name!r}; choose one of {', '.join(SALIENCIES)}")
    return name


def saliency_scores(weight: torch.Tensor, saliency: str, stats: InputStats | None = None) -> torch.Tensor:
    """Score matrix in the reduction view [rows, K]; larger = more important."""
    w = reduction_view(weight.detach().float()).abs()
    if saliency == "magnitude":
        return w
    if stats is None:
        raise MpdeployError(f"saliency {saliency!r} needs calibration data; pass --calib DIR|digits")
    return w * stats.col_norm.to(w.device).unsqueeze(0)


def keep_patterns(pattern: NM) -> torch.Tensor:
    """All C(M, N) keep-masks of one group, [count, M] bool."""
    combos = list(itertools.combinations(range(pattern.m), pattern.n))
    masks = torch.zeros(len(combos), pattern.m, dtype=torch.bool)
    for i, keep in enumerate(combos):
        masks[i, list(keep)] = True
    return masks


def block_cost_mask_2d(w2d: torch.Tensor, group_cov: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Exhaustive block-cost mask in the reduction view. `group_cov` is [K/M, M, M]."""
    rows, k = w2d.shape
    m = pattern.m
    g_count = k // m
    patterns = keep_patterns(pattern)
    removed = (~patterns).double()  # [P, M]
    # Only the upper triangle of the symmetric quadratic form: off-diagonal terms counted twice.
    iu, ju = torch.triu_indices(m, m)
    factor = torch.where(iu == ju, 1.0, 2.0).double()
    rr = removed[:, iu] * removed[:, ju] * factor  # [P, T]
    w = w2d.double().reshape(rows, g_count, m)
    cov_t = group_cov.double()[:, iu, ju]  # [G, T]
    per_row = max(1, BLOCK_COST_CHUNK_BYTES // (8 * g_count * (len(patterns) + len(iu))))
    best = torch.empty(rows, g_count, dtype=torch.long)
    for start in range(0, rows, per_row):
        chunk = w[start : start + per_row]  # [r, G, M]
        q = chunk[:, :, iu] * chunk[:, :, ju] * cov_t.unsqueeze(0)  # [r, G, T]
        cost = q.reshape(-1, len(iu)) @ rr.T  # [r*G, P]
        best[start : start + per_row] = cost.argmin(dim=1).reshape(-1, g_count)
    return patterns[best].reshape(rows, k)


def compute_mask(weight: torch.Tensor, pattern: NM, saliency: str, stats: InputStats | None = None) -> torch.Tensor:
    """N:M keep-mask of the weight's own shape."""
    shape = tuple(weight.shape)
    if saliency == "block-cost":
        if stats is None or pattern.m not in stats.group_cov:
            raise MpdeployError("saliency 'block-cost' needs calibration data; pass --calib DIR|digits")
        mask2d = block_cost_mask_2d(reduction_view(weight.detach().float()), stats.group_cov[pattern.m], pattern)
    else:
        mask2d = nm_mask_2d(saliency_scores(weight, saliency, stats), pattern)
    return from_reduction_view(mask2d, shape)


def removed_energy_fraction(weight: torch.Tensor, mask: torch.Tensor, saliency: str, stats: InputStats | None) -> float:
    """Share of squared saliency a mask removes: the per-layer damage estimate budgets compare."""
    kind = "magnitude" if saliency == "magnitude" or stats is None else "wanda"
    scores = saliency_scores(weight, kind, stats) ** 2
    keep = reduction_view(mask)
    total = float(scores.sum())
    return 0.0 if total == 0 else float(scores[~keep].sum()) / total


def pattern_count(pattern: NM) -> int:
    return math.comb(pattern.m, pattern.n)

"""What a saliency criterion reads and answers, per layer: the running input statistics (`InputStats`)
and the chosen mask (`MaskChoice`). Below both saliency and restore, which use them (restore refits
the weights of a choice on the same statistics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mpdeploy.core.errors import MpdeployError


@dataclass
class InputStats:
    """Running statistics of one layer's reduction-aligned inputs X [rows, K]."""

    col_sq_sum: torch.Tensor | None = None  # [K]
    group_cov: dict[int, torch.Tensor] = field(default_factory=dict)  # M -> [K/M, M, M] sums of h_g h_g^T
    rows: int = 0
    # Full covariance of the im2col rows (weight.reshape(out, -1) column order), only for OBS criteria.
    # Accumulated with `add_gram_` (block upper triangle) and completed by `symmetrize_` when the
    # collection ends, so at rest both are the full symmetric sums.
    gram: torch.Tensor | None = None  # sum X^T X over calibration inputs (float32)
    gram_rows: int = 0
    held_gram: torch.Tensor | None = None  # the same over held-out inputs (judges `auto`)
    held_rows: int = 0
    rows_match: bool | None = None  # do the im2col rows reproduce the layer's output? (None: not checked)

    def hessian(self, held: bool = False) -> torch.Tensor | None:
        """E[x x^T] (float32) over calibration (or held-out, falling back to calibration) im2col rows.
        float32 like the sums: every product that reads it (OBS factor, CG, judge) runs in float32."""
        if held and self.held_gram is not None and self.held_rows:
            return self.held_gram / self.held_rows
        return None if self.gram is None or not self.gram_rows else self.gram / self.gram_rows

    def update(self, x2d: torch.Tensor, group_sizes: tuple[int, ...] = ()) -> None:
        # Squares summed in float32 per batch (torch's cascaded sum: accurate, and 5x faster than a
        # float64 copy), batches in float64.
        sq = x2d.float().square().sum(0).double()
        self.col_sq_sum = sq if self.col_sq_sum is None else self.col_sq_sum + sq
        x = x2d.double() if group_sizes else x2d
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


# Column block of the Gram accumulation: only blocks on or above the diagonal are multiplied, which
# does (n+1)/2n of the full product's work for n blocks (0.55x at K=2304; X^T X is symmetric).
GRAM_BLOCK = 256


def add_gram_(acc: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """acc += rows^T rows in place (float32, float64 for float64 rows; a new accumulator when `acc` is
    None), on the block upper triangle only when K > GRAM_BLOCK: the strictly lower blocks stay as they
    were until `symmetrize_`."""
    rows = rows if rows.dtype == torch.float64 else rows.float()
    k = rows.shape[1]
    if acc is None:
        acc = torch.zeros(k, k, dtype=rows.dtype, device=rows.device)
    rows = rows.to(acc.dtype)
    if k <= GRAM_BLOCK:
        return acc.addmm_(rows.T, rows)
    for a in range(0, k, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, k)
        acc[a:b, a:].addmm_(rows[:, a:b].T, rows[:, a:])
    return acc


def symmetrize_(acc: torch.Tensor | None) -> torch.Tensor | None:
    """Complete an `add_gram_` accumulator in place: everything below the diagonal becomes the
    transpose of what is above it (exactly symmetric, as X^T X is; inside a diagonal block the two
    triangles of a product differ only by rounding)."""
    if acc is None:
        return acc
    k = acc.shape[0]
    for a in range(0, k, GRAM_BLOCK):
        b = min(a + GRAM_BLOCK, k)
        diag = acc[a:b, a:b]
        diag.copy_(diag.triu() + diag.triu(1).T)
        acc[b:, a:b] = acc[a:b, b:].T
    return acc


@dataclass(frozen=True)
class MaskChoice:
    """A criterion's answer for one layer and pattern."""

    mask: torch.Tensor  # bool, the weight's shape
    weight: torch.Tensor | None = None  # updated weights (zero outside the mask); None: weight * mask
    error: float | None = None  # relative output error on held-out inputs, where measured
    chosen: str | None = None  # `auto`: the criterion it picked
    # True: `weight` is already the mask-fixed refit on the calibration covariance (OBS sweep + CG at
    # restore's damping), bit for bit what restore would compute from the same covariance.
    refit: bool = False

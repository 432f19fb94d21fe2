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
    # Full covariance of the im2col rows (weight.reshape(out, -1) column order), only for OBS criteria:
    gram: torch.Tensor | None = None  # sum X^T X over calibration inputs (float32)
    gram_rows: int = 0
    held_gram: torch.Tensor | None = None  # the same over held-out inputs (judges `auto`)
    held_rows: int = 0
    rows_match: bool | None = None  # do the im2col rows reproduce the layer's output? (None: not checked)

    def hessian(self, held: bool = False) -> torch.Tensor | None:
        """E[x x^T] over calibration (or held-out, falling back to calibration) im2col rows."""
        if held and self.held_gram is not None and self.held_rows:
            return self.held_gram.double() / self.held_rows
        return None if self.gram is None or not self.gram_rows else self.gram.double() / self.gram_rows

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

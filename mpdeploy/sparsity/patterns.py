"""N:M sparsity patterns: the typed value, masks along the reduction dimension, compliance checks.

Groups are M consecutive weights along the reduction (input) dimension: `in` for a Linear weight
[out, in]; `C_in` at each kernel position for a Conv weight [C_out, C_in/g, kh, kw], which is what
TensorRT and cuDNN accelerate (grouping the flattened C_in*kh*kw would not be).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mpdeploy.core.errors import MpdeployError

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class NM:
    """Keep `n` of every `m` consecutive weights along the reduction dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise MpdeployError(f"N:M pattern needs integers, got {self.n!r}:{self.m!r}")
        if self.m < 1 or self.n < 1 or self.n >= self.m:
            raise MpdeployError(
                f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M (keep N of every M), e.g. 2:4 or 8:16"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def runs_sparse(self) -> bool:
        """True if sparse tensor cores can run it: every aligned group of 4 is guaranteed to hold at
        most 2 nonzeros (2:4 itself, and e.g. 1:4, 2:8, 1:2). Other patterns are audit-only."""
        return (self.m % 4 == 0 and self.n <= 2) or (self.m == 2 and self.n == 1)

    @property
    def execution_density(self) -> float:
        """MAC fraction sparse hardware actually executes: 0.5 for 2:4-compatible, else 1 (dense)."""
        return 0.5 if self.runs_sparse else 1.0


def parse_pattern(text: str | NM) -> NM:
    """Parse "2:4" into NM(2, 4); reject anything else with a message that shows a valid example."""
    if isinstance(text, NM):
        return text
    match = _PATTERN_RE.match(str(text))
    if not match:
        raise MpdeployError(f"cannot parse N:M pattern {text!r}: write it as N:M with integers, e.g. 2:4")
    return NM(int(match.group(1)), int(match.group(2)))


def reduction_view(weight: torch.Tensor) -> torch.Tensor:
    """2-D view [rows, K] with the reduction dimension last (contiguous copy for conv)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        c_out, c_in, kh, kw = weight.shape
        return weight.permute(0, 2, 3, 1).reshape(c_out * kh * kw, c_in)
    if weight.dim() == 3:  # Conv1d [C_out, C_in, k]
        c_out, c_in, k = weight.shape
        return weight.permute(0, 2, 1).reshape(c_out * k, c_in)
    raise MpdeployError(f"cannot take the reduction view of a {weight.dim()}-D weight {tuple(weight.shape)}")


def from_reduction_view(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `reduction_view`."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    if len(shape) == 3:
        c_out, c_in, k = shape
        return matrix.reshape(c_out, k, c_in).permute(0, 2, 1).contiguous()
    raise MpdeployError(f"cannot restore a {len(shape)}-D weight from its reduction view")


def nm_mask_2d(saliency: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Boolean mask [rows, K] keeping the `n` most salient of each `m` consecutive columns.

    Ties break toward the lower index (stable), so the mask is deterministic.
    """
    rows, k = saliency.shape
    if k % pattern.m:
        raise MpdeployError(f"reduction dimension {k} is not a multiple of M={pattern.m} for pattern {pattern}")
    groups = saliency.reshape(rows, k // pattern.m, pattern.m)
    # Sort descending with a stable order; keep the first n.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(rows, k)


def nm_mask(saliency: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Mask of the weight's own shape (Linear 2-D or Conv 4-D), groups along the reduction dimension."""
    mask2d = nm_mask_2d(reduction_view(saliency.detach().float()), pattern)
    return from_reduction_view(mask2d, tuple(saliency.shape))


def nm_violations(weight: torch.Tensor, pattern: NM) -> int:
    """Number of M-groups holding more than N nonzeros (0 means exactly compliant)."""
    view = reduction_view(weight.detach())
    rows, k = view.shape
    if k % pattern.m:
        return math.ceil(k / pattern.m) * rows
    nonzero = (view != 0).reshape(rows, k // pattern.m, pattern.m).sum(-1)
    return int((nonzero > pattern.n).sum())


def is_nm_compliant(weight: torch.Tensor, pattern: NM) -> bool:
    return nm_violations(weight, pattern) == 0


def is_24_compliant_2d(matrix, axis: int) -> bool:
    """TensorRT's rule on a raw 2-D array: groups of 4 along `axis` hold at most 2 nonzeros."""
    import numpy as np

    arr = np.asarray(matrix)
    if arr.ndim != 2:
        raise ValueError("expects a 2-D array")
    arr = np.moveaxis(arr, axis, -1)
    if arr.shape[-1] % 4:
        return False
    groups = (arr != 0).reshape(*arr.shape[:-1], arr.shape[-1] // 4, 4).sum(-1)
    return bool((groups <= 2).all())

"""Optimal Brain Surgeon sweeps (the SparseGPT form) over one layer's weight matrix.

With H = X^T X / rows + lambda I (X: the layer's inputs as rows, columns in the order of the weight
matrix) and U the upper Cholesky factor of H^-1 (U^T U = H^-1), columns are visited left to right;
removing weight column j moves the still-unvisited columns by err_j U[j, j+1:], err_j = (w_j - q_j) /
U[j, j] (Frantar & Alistarh, SparseGPT, 2023). Updates are applied lazily in blocks of columns, so the
cost is one Cholesky factor (O(K^3)) plus O(rows * K^2), against O(rows * |K|^3) for a separate
least-squares solve per output row.

Two uses:
- `keep` given (fixed mask): the kept weights are refit, the pattern never changes (prune-restore).
- `pattern` given: inside each group of M consecutive columns the N weights with the smallest OBS
  error w^2 / U[j, j]^2 are kept, chosen with the weights as updated so far (SparseGPT's N:M mask
  selection); mask choice and update together.
"""

from __future__ import annotations

import torch

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM
from mpdeploy.sparsity.threads import single_thread

BLOCK = 128  # columns per lazy-update block (a multiple of every M used in practice)
# Below this many multiply-adds per [out, K] x [K, K] product a layer's refit runs on one thread: the
# per-column updates are small element-wise ops, and on a loaded machine waking a second OpenMP thread
# for each costs more than the op (measured: ViT-Tiny restore 28 CPU s with 2 threads, 2.7 s with 1).
SINGLE_THREAD_WORK = 5e7


def upper_inverse_factor(h: torch.Tensor, lam: float) -> torch.Tensor:
    """U upper triangular with U^T U = (H + lam I)^-1 (float32), from one Cholesky factor and one
    triangular inverse: with J the reversal, J H J = L L^T gives U = J L^-1 J."""
    k = h.shape[0]
    flipped = torch.flip(h.float(), (0, 1))  # a copy: the dead columns below are set on it, not on `h`
    eye = torch.eye(k, dtype=torch.float32, device=h.device)
    # A column nobody excites (all-zero input) has H_jj = 0: make it independent so the factor exists.
    dead = torch.diagonal(flipped) <= 0
    flipped[dead, dead] = 1.0
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(flipped + (lam * 10**attempt) * eye)
        if int(info) == 0:
            break
    else:
        raise MpdeployError("layer input covariance is not positive definite even with strong damping; "
                            "check the calibration data (NaN or constant images?)")
    return torch.flip(lower_triangular_inverse(chol), (0, 1))


TRIANGULAR_BASE = 256  # below this size `lower_triangular_inverse` calls the triangular solve directly


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L^-1 for lower triangular L, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].
    About K^3 / 3 multiply-adds, mostly in matrix products, against K^3 for a triangular solve with
    the identity as right-hand side (which does not know the result is triangular)."""
    k = lower.shape[0]
    if k <= TRIANGULAR_BASE:
        eye = torch.eye(k, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    half = k // 2
    a_inv = lower_triangular_inverse(lower[:half, :half])
    d_inv = lower_triangular_inverse(lower[half:, half:])
    out = torch.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = d_inv
    out[half:, :half] = -(d_inv @ (lower[half:, :half] @ a_inv))
    return out


def obs_sweep(
    weight: torch.Tensor,
    u: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    pattern: NM | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One OBS sweep. weight [out, K] (columns in the order of `u`); exactly one of `keep` ([out, K]
    bool, fixed) or `pattern` (N:M along consecutive columns, chosen on the fly). Returns (new weights,
    zero outside the mask, float32; the keep-mask)."""
    if (keep is None) == (pattern is None):
        raise ValueError("obs_sweep needs exactly one of keep= or pattern=")
    w = weight.detach().float().clone()
    rows, k = w.shape
    u = u.float()
    if pattern is not None:
        if k % pattern.m:
            raise MpdeployError(f"reduction dimension {k} is not a multiple of M={pattern.m} for pattern {pattern}")
        block = max(pattern.m, block - block % pattern.m)
        keep = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    else:
        keep = keep.bool().to(w.device)
    diag = torch.diagonal(u)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        with single_thread():
            _sweep_block(w1, u1, err1, keep, i1, diag, pattern)
        w[:, i1:i2] = w1
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w * keep, keep


SUB_BLOCK = 16  # columns whose updates to the rest of their block are applied as one product


def _sweep_block(w1, u1, err1, keep, i1, diag, pattern) -> None:
    """The column-by-column OBS updates inside one block (in place on w1, err1, keep).

    Each column's update reaches the rest of its sub-block at once (small element-wise ops) and the
    rest of the block after the sub-block, as one [out, sub] x [sub, rest] product: the same updates
    as one outer product per column over the whole block, in fewer and larger operations. A sub-block
    holds whole N:M groups, so a group's mask is chosen from weights every earlier column updated."""
    width = w1.shape[1]
    m = pattern.m if pattern is not None else 1
    sub = m * -(-SUB_BLOCK // m)
    for s in range(0, width, sub):
        e = min(s + sub, width)
        for i in range(s, e):
            if pattern is not None and i % m == 0:
                score = w1[:, i : i + m] ** 2 / diag[i1 + i : i1 + i + m].unsqueeze(0) ** 2
                top = torch.topk(score, pattern.n, dim=1).indices
                keep[:, i1 + i : i1 + i + m].scatter_(1, top, True)
            col = w1[:, i]
            q = col * keep[:, i1 + i]
            err = (col - q) / u1[i, i]
            w1[:, i:e] -= err.unsqueeze(1) * u1[i, i:e].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        if e < width:
            w1[:, e:] -= err1[:, s:e] @ u1[s:e, e:]


def reduction_order(shape: tuple[int, ...]) -> torch.Tensor:
    """Permutation of the flattened weight columns (C_in slowest, as weight.reshape(out, -1) and
    F.unfold lay them out) into the N:M grouping order (kernel position slowest, C_in fastest)."""
    if len(shape) == 2:
        return torch.arange(shape[1])
    c_in = shape[1]
    spatial = 1
    for s in shape[2:]:
        spatial *= s
    return torch.arange(c_in * spatial).reshape(c_in, spatial).T.reshape(-1)


def refine_masked_ridge(
    start: torch.Tensor, dense: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, lam: float, steps: int
) -> torch.Tensor:
    """Jacobi-preconditioned conjugate gradient, batched over output rows, on the exact restore
    objective (v - w)^T H (v - w) + lam ||v||^2 with v zero outside `keep` (its minimizer is the
    per-row ridge solution `restore.refit_rows` computes). One [out, K] x [K, K] product per step;
    starting from the OBS sweep a few steps close most of the gap to the exact solve."""
    if steps <= 0:
        return start
    keep = keep.float()
    hf = h.float()
    # H + lam I once: every step's product then needs no extra [out, K] term.
    h_damped = hf.clone()
    h_damped.diagonal().add_(lam)
    v = start.float() * keep
    w = dense.float()
    precond = keep / torch.diagonal(h_damped).clamp_min(1e-12).unsqueeze(0)
    residual = ((w - v) @ hf - lam * v) * keep  # minus half the gradient: w H - v (H + lam I), one product
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    for _ in range(steps):  # in place where it can be: [out, K] temporaries cost as much as the product
        a_dir = torch.mm(direction, h_damped).mul_(keep)
        curvature = (direction * a_dir).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        v.addcmul_(alpha, direction)
        residual.addcmul_(alpha, a_dir, value=-1.0)
        z = torch.mul(residual, precond, out=z)
        rz_new = (residual * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        direction.mul_(beta).add_(z)
        rz = rz_new
    return v.mul_(keep)

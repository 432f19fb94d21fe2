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
    """U upper triangular with U^T U = (H + lam I)^-1, from one Cholesky factor and one triangular
    inverse: with J the reversal, J H J = L L^T gives U = J L^-1 J."""
    k = h.shape[0]
    h = h.double()
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    # A column nobody excites (all-zero input) has H_jj = 0: make it independent so the factor exists.
    dead = torch.diagonal(h) <= 0
    h = h.clone()
    h[dead, dead] = 1.0
    for attempt in range(6):
        damped = torch.flip(h + (lam * 10**attempt) * eye, (0, 1)).float()
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    else:
        raise MpdeployError("layer input covariance is not positive definite even with strong damping; "
                            "check the calibration data (NaN or constant images?)")
    inv = torch.linalg.solve_triangular(chol, torch.eye(k, dtype=chol.dtype, device=h.device), upper=False)
    return torch.flip(inv, (0, 1))


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


def _sweep_block(w1, u1, err1, keep, i1, diag, pattern) -> None:
    """The column-by-column OBS updates inside one block (in place on w1, err1, keep)."""
    for i in range(w1.shape[1]):
        if pattern is not None and i % pattern.m == 0:
            score = w1[:, i : i + pattern.m] ** 2 / diag[i1 + i : i1 + i + pattern.m].unsqueeze(0) ** 2
            top = torch.topk(score, pattern.n, dim=1).indices
            keep[:, i1 + i : i1 + i + pattern.m].scatter_(1, top, True)
        col = w1[:, i]
        q = col * keep[:, i1 + i]
        err = (col - q) / u1[i, i]
        w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        w1[:, i] = q
        err1[:, i] = err


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
    h_damped = hf + lam * torch.eye(hf.shape[0], dtype=hf.dtype, device=hf.device)
    v = start.float() * keep
    w = dense.float()
    precond = keep / torch.diagonal(h_damped).clamp_min(1e-12).unsqueeze(0)
    residual = (w @ hf - v @ h_damped) * keep  # minus half the gradient
    z = residual * precond
    direction = z.clone()
    rz = (residual * z).sum(1, keepdim=True)
    for _ in range(steps):
        a_dir = (direction @ h_damped) * keep
        curvature = (direction * a_dir).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        v = v + alpha * direction
        residual = residual - alpha * a_dir
        z = residual * precond
        rz_new = (residual * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        direction = z + beta * direction
        rz = rz_new
    return v * keep

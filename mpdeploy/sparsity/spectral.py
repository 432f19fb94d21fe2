"""Marchenko-Pastur (MP) fit of one weight matrix's spectrum, and the budget signals built on it.

See docs/method.md section 1. For a matrix with p = min side, n = max side, gamma = p/n, the eigenvalues
lambda_k = s_k^2 / n of a pure-noise matrix (iid entries, variance sigma^2) follow MP(gamma, sigma^2)
with edges sigma^2 (1 +- sqrt(gamma))^2. We estimate sigma^2 from the middle of the spectrum (BEMA),
put the bulk edge a Tracy-Widom (TW) margin above the MP edge, and count singular values above it as
spikes (signal).

Default TW quantile, DEFAULT_TW_QUANTILE = 1.5 (measured here, not taken from a table).
False-spike rate = share of iid Gaussian draws with spikes > 0 (seeded, 2000 draws per shape unless
noted):

    t      200x400  64x576  32x288  100x100  192x768  768x768(200)  1000x200(300)  16x16(1000)
    0.98   4.9%     4.6%    5.0%    4.9%     4.5%     4%            4%             6.3%
    1.5    2.5%     2.4%    2.1%    2.0%     1.8%     1%            1.7%           3.6%

TW1's 95% quantile (0.98) alone already sits right at 5%: BEMA's sigma_hat error (sd ~0.3% at
200x400, ~0.1% at 768x768) widens the spread, but at these sizes the largest noise eigenvalue also
sits below the asymptotic TW centre, and the two roughly cancel. 0.98 leaves no room for sampling
noise or small matrices (16x16: 6.3%); 1.5 keeps every measured shape at or under ~3.6%.

Cost of the margin: sigma_+ sits above the pure MP edge sigma (sqrt(n) + sqrt(p)) by the margin
alone, before any estimation error (relative, in singular values):

    t      3072x768  768x768  1000x200  192x768  200x400  64x576  100x100
    1.0    0.23%     0.37%    0.51%     0.57%    0.72%    0.86%   1.45%
    1.5    0.34%     0.56%    0.76%     0.86%    1.08%    1.28%   2.17%

So "sigma_+ within 1% of sigma (sqrt(n)+sqrt(p))" holds for transformer-sized matrices
(768x768 and larger, margin <= 0.56%; 1000x200 with less room), but cannot hold for 64x576 with any
t that keeps noise spikes near 5% (the margin is 0.86% already at t = 1, plus BEMA's ~0.4% error).
The tests check the MP edge fit itself (tw_quantile=0) within 1% on every shape, and the default
edge within 1% of sigma (sqrt(n)+sqrt(p)) where the margin allows it, else of the edge with margin.

Hill exponent: density exponent of the eigenvalue tail, p(lambda) ~ lambda^(-alpha) (the
heavy-tailed self-regularization convention, alpha ~ 2-6 for trained layers, large for noise),
estimated from the top k = max(5, floor(0.1 p)) eigenvalues: alpha = 1 + k / sum_i ln(lambda_i /
lambda_(k+1)). 10% of p follows common practice for spectra of a few hundred values; the floor of 5
keeps the estimate defined on small matrices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.25
DEFAULT_TW_QUANTILE = 1.5
# Below this side length the bulk has too few eigenvalues for a meaningful MP fit.
MIN_SIDE = 8


# --- weight -> matrices -------------------------------------------------------------------------


def _as_float64(weight: Any) -> np.ndarray:
    """Torch tensor (any dtype / device) or array-like -> float64 numpy array."""
    try:
        import torch
    except ImportError:  # numpy-only use
        torch = None
    if torch is not None and isinstance(weight, torch.Tensor):
        if weight.is_meta:
            raise MpdeployError("weight is on the meta device (not materialized); load real weights first")
        return weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(weight, dtype=np.float64)


def spectral_matrices(weight: Any, groups: int = 1) -> list[np.ndarray]:
    """The matrices whose spectra we fit: Linear [out, in] as is; Conv unfolded to
    [C_out, C_in/g * kh * kw] and split into one matrix per group (float64)."""
    w = _as_float64(weight)
    if groups < 1:
        raise MpdeployError(f"groups must be >= 1, got {groups}")
    if w.ndim < 2:
        raise MpdeployError(f"weight of shape {tuple(w.shape)} is not a matrix or conv kernel; pass a Linear/Conv weight")
    mat = w.reshape(w.shape[0], -1)
    if w.ndim == 2 and groups != 1:
        raise MpdeployError(f"groups={groups} given for a 2-D (Linear) weight; groups apply to conv kernels only")
    if mat.shape[0] % groups:
        raise MpdeployError(f"weight has {mat.shape[0]} output channels, not divisible by groups={groups}")
    # Grouped conv: output channels of group g only see input group g; the kernel's second dim is
    # already C_in/g, so splitting rows gives each group's own [C_out/g, C_in/g*kh*kw] matrix.
    return list(np.split(mat, groups, axis=0)) if groups > 1 else [mat]


def skip_reason(matrix: np.ndarray) -> str | None:
    """Why `matrix` cannot be fitted (None if it can)."""
    rows, cols = matrix.shape
    if min(rows, cols) < MIN_SIDE:
        return (
            f"matrix {rows}x{cols} is too small for an MP fit (min side {min(rows, cols)} < {MIN_SIDE}); "
            "typical of depthwise / narrow grouped convs"
        )
    if not np.all(np.isfinite(matrix)):
        return "weight has NaN or Inf entries"
    if not np.any(matrix):
        return "weight is all zeros"
    return None


# --- the Marchenko-Pastur law (sigma^2 = 1 unless given) ----------------------------------------


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Lower and upper edge of MP(gamma, sigma2)'s support."""
    r = math.sqrt(gamma)
    return sigma2 * (1 - r) ** 2, sigma2 * (1 + r) ** 2


def _check_gamma(gamma: float) -> None:
    if not 0 < gamma <= 1:
        raise MpdeployError(f"MP ratio gamma must be in (0, 1], got {gamma}")


def mp_pdf(x: Any, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of MP(gamma, sigma2) for gamma in (0, 1] (no atom at 0)."""
    _check_gamma(gamma)
    x = np.asarray(x, dtype=np.float64) / sigma2
    a, b = mp_edges(gamma)
    inside = (x > a) & (x < b)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((b - xi) * (xi - a)) / (2 * np.pi * gamma * xi)
    return out / sigma2


def _mp_cdf_phi(phi: np.ndarray, gamma: float) -> np.ndarray:
    """MP CDF as a function of phi in [0, pi], where x = (1+gamma) - 2 sqrt(gamma) cos(phi).

    Closed form of the integral of the density under that substitution:
    2 pi gamma F = (1+gamma) phi + 2 sqrt(g) sin(phi) - 2 (1-gamma) atan(sqrt(b/a) tan(phi/2)).
    arctan2 keeps it finite at phi = pi and at gamma = 1 (a = 0, where the last term vanishes).
    """
    a, b = mp_edges(gamma)
    atan = np.arctan2(math.sqrt(b) * np.sin(phi / 2), math.sqrt(a) * np.cos(phi / 2))
    val = (1 + gamma) * phi + 2 * math.sqrt(gamma) * np.sin(phi) - 2 * (1 - gamma) * atan
    return np.clip(val / (2 * np.pi * gamma), 0.0, 1.0)


def mp_cdf(x: Any, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """CDF of MP(gamma, sigma2): 0 below the lower edge, 1 above the upper edge."""
    _check_gamma(gamma)
    x = np.asarray(x, dtype=np.float64) / sigma2
    cos_phi = np.clip(((1 + gamma) - x) / (2 * math.sqrt(gamma)), -1.0, 1.0)
    return _mp_cdf_phi(np.arccos(cos_phi), gamma)


def mp_quantile(levels: Any, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Inverse MP CDF, vectorized bisection in phi (where the CDF is smooth and monotone)."""
    _check_gamma(gamma)
    levels = np.asarray(levels, dtype=np.float64)
    if np.any((levels < 0) | (levels > 1)):
        raise MpdeployError("MP quantile levels must lie in [0, 1]")
    lo = np.zeros_like(levels)
    hi = np.full_like(levels, np.pi)
    for _ in range(60):  # pi / 2^60: far below float64 resolution of x
        mid = 0.5 * (lo + hi)
        below = _mp_cdf_phi(mid, gamma) < levels
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    phi = 0.5 * (lo + hi)
    return sigma2 * ((1 + gamma) - 2 * math.sqrt(gamma) * np.cos(phi))


def tw_edge(gamma: float, n: int, sigma2: float, tw_quantile: float) -> float:
    """Eigenvalue edge T_+ with the Tracy-Widom finite-size margin (note the exponent (4/3))."""
    r = math.sqrt(gamma)
    return sigma2 * ((1 + r) ** 2 + tw_quantile * n ** (-2 / 3) * gamma ** (-1 / 6) * (1 + r) ** (4 / 3))


# --- the fit ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MPFit:
    """One matrix's MP fit. Singular values s, eigenvalues lambda = s^2 / n."""

    shape: tuple[int, int]  # (n, p): n = max side, p = min side
    gamma: float  # p / n
    sigma_hat: float  # noise std estimated by BEMA
    sigma_plus: float  # singular-value bulk edge sqrt(n T_+)
    lambda_plus: float  # eigenvalue bulk edge T_+ (includes the TW margin)
    spikes: int  # singular values above sigma_plus
    bulk_fraction: float  # share of squared Frobenius norm not in spikes
    ks_distance: float  # KS distance, bulk eigenvalues vs MP(gamma, sigma_hat^2)
    hill_alpha: float  # tail density exponent of the top eigenvalues (nan if undefined)
    gavish_donoho_threshold: float  # singular-value hard threshold (unknown noise)
    gd_rank: int  # singular values above it
    tw_quantile: float
    alpha: float  # BEMA trimming

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become None (JSON has no NaN)."""
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values, descending, via eigvalsh of the smaller Gram matrix (several times faster
    than an SVD; float64 keeps the small ones accurate enough for a bulk fit)."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    eig = np.linalg.eigvalsh(gram)
    return np.sqrt(np.clip(eig, 0.0, None))[::-1]


def bema_sigma2(lam_ascending: np.ndarray, gamma: float, alpha: float = DEFAULT_ALPHA) -> float:
    """BEMA: least-squares match of the central eigenvalues to MP(gamma, 1) quantiles."""
    p = lam_ascending.size
    k = np.arange(math.ceil(alpha * p), math.ceil((1 - alpha) * p))
    if k.size == 0:
        raise MpdeployError(f"BEMA window is empty for p={p}, alpha={alpha}; use a smaller alpha")
    q = mp_quantile((k + 0.5) / p, gamma)
    return float(np.dot(q, lam_ascending[k]) / np.dot(q, q))


def hill_alpha(lam_descending: np.ndarray) -> float:
    """Hill estimate of the tail density exponent from the top k = max(5, 10% of p) eigenvalues."""
    p = lam_descending.size
    k = min(max(5, int(0.1 * p)), p - 1)
    if k < 1:
        return float("nan")
    x_min = lam_descending[k]
    if x_min <= 0:
        return float("nan")
    logs = np.log(lam_descending[:k] / x_min)
    total = float(logs.sum())
    return 1.0 + k / total if total > 0 else float("nan")


def gavish_donoho_threshold(s: np.ndarray, beta: float) -> float:
    """Gavish & Donoho (2014) optimal hard threshold for unknown noise: omega(beta) * median(s)."""
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return float(omega * np.median(s))


def ks_distance(sample: np.ndarray, gamma: float, sigma2: float) -> float:
    """Two-sided KS distance between the empirical CDF of `sample` and MP(gamma, sigma2)."""
    m = sample.size
    if m == 0:
        return float("nan")
    f = mp_cdf(np.sort(sample), gamma, sigma2)
    i = np.arange(1, m + 1)
    return float(max(np.max(i / m - f), np.max(f - (i - 1) / m)))


def fit_marchenko_pastur(weight: Any, *, alpha: float = DEFAULT_ALPHA, tw_quantile: float | None = None) -> MPFit:
    """Fit the MP bulk of one matrix (torch tensor or array, 2-D). Conv kernels: use
    `spectral_matrices` first."""
    t = DEFAULT_TW_QUANTILE if tw_quantile is None else float(tw_quantile)
    if not 0 <= alpha < 0.5:
        raise MpdeployError(f"BEMA alpha must be in [0, 0.5), got {alpha}")
    matrix = _as_float64(weight)
    if matrix.ndim != 2:
        raise MpdeployError(
            f"MP fit needs a 2-D matrix, got shape {tuple(matrix.shape)}; unfold conv kernels with spectral_matrices()"
        )
    reason = skip_reason(matrix)
    if reason:
        raise MpdeployError(f"cannot fit this matrix: {reason}")
    n, p = max(matrix.shape), min(matrix.shape)
    gamma = p / n

    s = singular_values(matrix)  # descending
    lam = s**2 / n
    sigma2 = bema_sigma2(lam[::-1], gamma, alpha)
    if sigma2 <= 0:
        raise MpdeployError("cannot fit this matrix: its central spectrum is zero (rank far below min side)")
    t_plus = tw_edge(gamma, n, sigma2, t)
    sigma_plus = math.sqrt(n * t_plus)
    spike = s > sigma_plus
    spikes = int(spike.sum())
    energy = float(np.sum(s**2))
    gd = gavish_donoho_threshold(s, gamma)
    return MPFit(
        shape=(n, p),
        gamma=gamma,
        sigma_hat=math.sqrt(sigma2),
        sigma_plus=sigma_plus,
        lambda_plus=t_plus,
        spikes=spikes,
        bulk_fraction=float(np.sum(s[~spike] ** 2) / energy),
        ks_distance=ks_distance(lam[~spike], gamma, sigma2),
        hill_alpha=hill_alpha(lam),
        gavish_donoho_threshold=gd,
        gd_rank=int(np.sum(s > gd)),
        tw_quantile=t,
        alpha=alpha,
    )


def eigenvalues(matrix: Any) -> np.ndarray:
    """lambda = s^2 / n, descending (what the fit and the plots look at)."""
    m = _as_float64(matrix)
    return singular_values(m) ** 2 / max(m.shape)


def standardize(values: Any) -> np.ndarray:
    """z-scores; all zeros when the values do not vary (or there is only one)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    std = v.std()
    if not np.isfinite(std) or std == 0:
        return np.zeros_like(v)
    return (v - v.mean()) / std

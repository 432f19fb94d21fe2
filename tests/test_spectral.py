"""Known-answer tests for the Marchenko-Pastur fit (mpdeploy.sparsity.spectral)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from mpdeploy.sparsity import spectral
from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.spectral import fit_marchenko_pastur, mp_cdf, mp_edges, mp_pdf, mp_quantile

SHAPES = [(768, 768), (768, 3072), (3072, 768), (64, 576), (1000, 200)]


def _noise(shape, sigma, seed):
    return sigma * np.random.default_rng(seed).standard_normal(shape)


def _mp_edge(shape, sigma):
    return sigma * (math.sqrt(shape[0]) + math.sqrt(shape[1]))


def _margin(shape, t=spectral.DEFAULT_TW_QUANTILE):
    """Relative amount by which the TW margin alone lifts sigma_+ above the MP edge."""
    n, p = max(shape), min(shape)
    return math.sqrt(n * spectral.tw_edge(p / n, n, 1.0, t)) / (math.sqrt(n) + math.sqrt(p)) - 1


def _planted(shape, rank, theta_norm, sigma, seed):
    """sigma * Z + sum_i theta sigma sqrt(n) u_i v_i^T: in normalized units (divide by sigma sqrt(n))
    noise with bulk edge 1 + sqrt(gamma) plus a rank-r signal of strength theta_norm."""
    rng = np.random.default_rng(seed)
    n = max(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    return sigma * rng.standard_normal(shape) + theta_norm * sigma * math.sqrt(n) * (u @ v.T)


# --- iid noise: the edge --------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.02, 1.7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_iid_gaussian_edge(shape, sigma):
    w = _noise(shape, sigma, seed=shape[0] * 7 + shape[1] + int(sigma * 100))
    fit = fit_marchenko_pastur(w)
    mp = _mp_edge(shape, sigma)
    assert fit.shape == (max(shape), min(shape))
    assert fit.sigma_hat == pytest.approx(sigma, rel=0.01)
    # The fitted MP edge itself (no TW margin): within 1% on every shape.
    assert fit_marchenko_pastur(w, tw_quantile=0).sigma_plus == pytest.approx(mp, rel=0.01)
    # The default edge = MP edge lifted by the TW margin (see the module docstring), within 1% of
    # that exact target everywhere ...
    assert fit.sigma_plus == pytest.approx(mp * (1 + _margin(shape)), rel=0.01)
    assert fit.sigma_plus > fit_marchenko_pastur(w, tw_quantile=0).sigma_plus
    # ... and within 1% of the bare MP edge wherever the margin leaves room (all but 64x576,
    # whose margin alone is 1.28%).
    if _margin(shape) < 0.008:
        assert fit.sigma_plus == pytest.approx(mp, rel=0.01)


def test_margin_table_matches_docstring():
    # The numbers quoted in the module docstring.
    assert _margin((768, 768)) == pytest.approx(0.0056, abs=5e-5)
    assert _margin((64, 576)) == pytest.approx(0.0128, abs=5e-5)
    assert _margin((64, 576), t=1.0) == pytest.approx(0.0086, abs=5e-5)


def test_tw_margin_uses_four_thirds_power():
    # (1 + sqrt g) ** (4/3), not ** 4 / 3: they differ by 2**(4/3) vs 16/3 at gamma = 1.
    n, t = 1000, 1.0
    margin = spectral.tw_edge(1.0, n, 1.0, t) - 4.0
    assert margin == pytest.approx(t * n ** (-2 / 3) * 2 ** (4 / 3), rel=1e-12)


def test_pure_noise_false_spike_rate():
    rng = np.random.default_rng(20260)
    draws = 200
    hits = sum(fit_marchenko_pastur(rng.standard_normal((200, 400))).spikes > 0 for _ in range(draws))
    assert hits <= 0.05 * draws, f"{hits}/{draws} pure-noise draws show spikes"
    # Without the TW margin the same draws would show spikes far more often: the margin matters.
    rng = np.random.default_rng(20260)
    bare = sum(fit_marchenko_pastur(rng.standard_normal((200, 400)), tw_quantile=0).spikes > 0 for _ in range(draws))
    assert bare > hits


# --- planted signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 20])
@pytest.mark.parametrize("shape", [(400, 1000), (1000, 400), (512, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_planted_rank_spikes(rank, shape):
    gamma = min(shape) / max(shape)
    sigma = 0.05
    w = _planted(shape, rank, 3 * gamma**0.25, sigma, seed=rank * 31 + shape[0])
    fit = fit_marchenko_pastur(w)
    assert fit.spikes == rank
    assert fit.gd_rank == rank  # Gavish-Donoho agrees
    # BEMA matches quantiles of all p eigenvalues, spikes included, so r spikes shift its window up by
    # r/p in level: ~2% bias on sigma_hat at r = 20, p = 400 (inherent to the method, small enough).
    assert fit.sigma_hat == pytest.approx(sigma, rel=0.01 + rank / min(shape) / 2)
    assert fit.bulk_fraction < 1.0


def test_signal_below_detection_threshold_gives_no_spikes():
    # theta below gamma^(1/4) (BBP): the signal hides inside the bulk; nothing should be reported.
    shape = (400, 1000)
    gamma = 0.4
    fit = fit_marchenko_pastur(_planted(shape, 3, 0.5 * gamma**0.25, 1.0, seed=5))
    assert fit.spikes == 0
    assert fit.gd_rank == 0
    assert fit.bulk_fraction == 1.0


# --- the MP law -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.02, 0.3, 0.5, 1.0])
def test_mp_cdf_sanity(gamma):
    lo, hi = mp_edges(gamma)
    assert np.all(mp_cdf([lo - 1e-3, lo - 0.5, -1.0], gamma) == 0.0)
    assert np.all(mp_cdf([hi + 1e-9, hi + 1.0, 10 * hi, 1e9], gamma) == 1.0)
    xs = np.linspace(lo - 0.1, hi + 0.1, 5001)
    f = mp_cdf(xs, gamma)
    assert np.all(np.diff(f) >= 0)
    assert f[0] == 0.0 and f[-1] == 1.0
    # Derivative of the closed-form CDF is the density.
    mid = np.linspace(lo, hi, 50)[5:-5]
    h = 1e-6
    deriv = (mp_cdf(mid + h, gamma) - mp_cdf(mid - h, gamma)) / (2 * h)
    np.testing.assert_allclose(deriv, mp_pdf(mid, gamma), rtol=1e-5)
    # Quantile inverts the CDF, both ways.
    u = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(mp_cdf(mp_quantile(u, gamma), gamma), u, atol=1e-10)
    np.testing.assert_allclose(mp_quantile(mp_cdf(mid, gamma), gamma), mid, rtol=1e-9)
    # sigma^2 scales the law.
    np.testing.assert_allclose(mp_cdf(3.0 * mid, gamma, sigma2=3.0), mp_cdf(mid, gamma), atol=1e-12)
    np.testing.assert_allclose(mp_quantile(u, gamma, sigma2=3.0), 3.0 * mp_quantile(u, gamma), rtol=1e-12)


@pytest.mark.parametrize("shape", [(1000, 2000), (800, 800)])
def test_mp_cdf_matches_large_sample_spectrum(shape):
    n = max(shape)
    lam = spectral.eigenvalues(np.random.default_rng(1).standard_normal(shape))
    gamma = min(shape) / n
    assert spectral.ks_distance(lam, gamma, 1.0) < 0.01
    # The wrong gamma is clearly rejected: the test can fail.
    assert spectral.ks_distance(lam, gamma * 0.7, 1.0) > 0.05


def test_ks_distance_flags_non_mp_bulk():
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((768, 768))
    # Columns with very different variances: not an iid bulk, the MP fit must look poor.
    skewed = noise * rng.uniform(0.1, 3.0, size=(1, 768))
    assert fit_marchenko_pastur(noise).ks_distance < 0.03
    assert fit_marchenko_pastur(skewed).ks_distance > 0.1


def test_hill_alpha_heavy_tail_vs_gaussian():
    rng = np.random.default_rng(4)
    gauss = fit_marchenko_pastur(rng.standard_normal((500, 1000)))
    heavy = fit_marchenko_pastur(rng.standard_t(1.5, size=(500, 1000)))
    # Heavy-tailed entries (tail index 1.5) give a power-law spectrum tail, alpha ~ 1 + 1.5/2.
    assert heavy.hill_alpha < 3.0 < gauss.hill_alpha


# --- inputs -----------------------------------------------------------------------------------------


def test_conv_unfolding_and_groups():
    w = torch.randn(64, 32, 3, 3)
    (m,) = spectral.spectral_matrices(w)
    assert m.shape == (64, 288) and m.dtype == np.float64
    np.testing.assert_allclose(m[5], w[5].reshape(-1).double().numpy())

    grouped = torch.randn(64, 8, 3, 3)  # Conv2d(32, 64, 3, groups=4)
    mats = spectral.spectral_matrices(grouped, groups=4)
    assert [x.shape for x in mats] == [(16, 72)] * 4
    np.testing.assert_allclose(mats[2], grouped[32:48].reshape(16, -1).double().numpy())

    depthwise = spectral.spectral_matrices(torch.randn(32, 1, 3, 3), groups=32)
    assert len(depthwise) == 32 and depthwise[0].shape == (1, 9)
    reason = spectral.skip_reason(depthwise[0])
    assert reason is not None and "too small" in reason
    with pytest.raises(MpdeployError, match="too small"):
        fit_marchenko_pastur(depthwise[0])

    linear = np.ones((10, 20))
    assert spectral.spectral_matrices(linear)[0].shape == (10, 20)


def test_input_errors():
    with pytest.raises(MpdeployError, match="not a matrix"):
        spectral.spectral_matrices(torch.randn(10))
    with pytest.raises(MpdeployError, match="not divisible"):
        spectral.spectral_matrices(torch.randn(10, 4, 3, 3), groups=3)
    with pytest.raises(MpdeployError, match="2-D"):
        fit_marchenko_pastur(torch.randn(16, 16, 3, 3))
    with pytest.raises(MpdeployError, match="all zeros"):
        fit_marchenko_pastur(np.zeros((32, 32)))
    bad = np.ones((32, 32))
    bad[0, 0] = np.nan
    with pytest.raises(MpdeployError, match="NaN"):
        fit_marchenko_pastur(bad)
    with pytest.raises(MpdeployError, match="alpha"):
        fit_marchenko_pastur(np.ones((32, 32)), alpha=0.5)


def test_torch_input_any_dtype():
    w = torch.from_numpy(_noise((256, 512), 0.02, seed=9))
    ref = fit_marchenko_pastur(w.numpy())
    assert fit_marchenko_pastur(w) == ref  # float64 tensor: same numbers
    half = fit_marchenko_pastur(w.to(torch.bfloat16).requires_grad_())
    assert half.sigma_hat == pytest.approx(ref.sigma_hat, rel=0.01)
    # Orientation does not matter.
    assert fit_marchenko_pastur(w.T).sigma_plus == pytest.approx(ref.sigma_plus, rel=1e-9)


def test_to_dict_is_json_ready():
    fit = fit_marchenko_pastur(_noise((64, 128), 1.0, seed=2))
    d = fit.to_dict()
    assert set(d) >= {"shape", "gamma", "sigma_hat", "sigma_plus", "lambda_plus", "spikes", "bulk_fraction",
                      "ks_distance", "hill_alpha", "gavish_donoho_threshold", "gd_rank"}
    assert d["shape"] == [128, 64]
    json.dumps(d, allow_nan=False)
    nan_fit = spectral.MPFit(**{**fit.__dict__, "hill_alpha": float("nan")})
    assert nan_fit.to_dict()["hill_alpha"] is None
    with pytest.raises(AttributeError):
        fit.spikes = 3  # frozen


def test_fit_is_fast():
    w = _noise((3072, 768), 0.02, seed=11)
    fit_marchenko_pastur(w)  # warm up BLAS
    start = time.perf_counter()
    fit_marchenko_pastur(w)
    assert time.perf_counter() - start < 1.0


def test_standardize():
    z = spectral.standardize([1.0, 2.0, 3.0, 4.0])
    assert z.mean() == pytest.approx(0.0, abs=1e-12) and z.std() == pytest.approx(1.0)
    assert np.all(z[1:] > z[:-1])
    np.testing.assert_array_equal(spectral.standardize([5.0, 5.0, 5.0]), np.zeros(3))
    np.testing.assert_array_equal(spectral.standardize([7.0]), np.zeros(1))
    assert spectral.standardize([]).size == 0

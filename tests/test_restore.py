"""Prune-restore (mpdeploy.sparsity.restore): the refit is the least-squares solution, masks never change,
held-out error never rises, and the prune stage's --restore path keeps every layer N:M."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM, is_nm_compliant
from mpdeploy.sparsity.restore import DEFAULT_DAMP, layer_rows, refit_rows, relative_error, restore_layers
from mpdeploy.sparsity.saliency import compute_mask


def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(rows, k, generator=g) @ mix


def prune_in_place(model: nn.Module, pattern: NM = NM(2, 4)) -> tuple[dict, dict]:  # noqa: B008
    """Magnitude N:M masks on every Linear/Conv2d; returns (masks, dense_state) keyed by parameter name."""
    masks, dense = {}, {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[1] % pattern.m == 0:
                dense[f"{name}.weight"] = m.weight.detach().clone()
                mask = compute_mask(m.weight, pattern, "magnitude")
                m.weight.mul_(mask)
                masks[f"{name}.weight"] = mask
    return masks, dense


def ridge_reference(x: np.ndarray, w_dense: np.ndarray, keep: np.ndarray, lam: float) -> np.ndarray:
    """min ||X_K w_K - X w||^2 / n + lam ||w_K||^2 via numpy lstsq on the augmented system."""
    n = x.shape[0]
    out = np.zeros_like(w_dense)
    for r in range(w_dense.shape[0]):
        kept = np.flatnonzero(keep[r])
        a = np.vstack([x[:, kept] / np.sqrt(n), np.sqrt(lam) * np.eye(len(kept))])
        b = np.concatenate([x @ w_dense[r] / np.sqrt(n), np.zeros(len(kept))])
        out[r, kept] = np.linalg.lstsq(a, b, rcond=None)[0]
    return out


def test_linear_refit_matches_numpy_least_squares():
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    model = nn.Sequential(layer).double()
    x = correlated_inputs(2000, 32, seed=1).double()
    calib = list(x[:1500].split(250))
    held = list(x[1500:].split(250))
    masks, dense = prune_in_place(model)
    pruned = layer.weight.detach().clone()
    report = restore_layers(model, masks, calib, held, dense_state=dense, solver="exact")

    entry = report["0"]
    xc = x[:1500].numpy()
    h = xc.T @ xc / xc.shape[0]
    lam = DEFAULT_DAMP * float(np.mean(np.diag(h)))
    assert entry["lambda"] == pytest.approx(lam, rel=1e-9)
    ref = ridge_reference(xc, dense["0.weight"].numpy(), masks["0.weight"].numpy(), lam)
    got = layer.weight.detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert entry["improved"] and entry["error_after"] < entry["error_before"]
    assert torch.equal(layer.weight.detach() != 0, masks["0.weight"])  # same zero pattern
    assert not torch.equal(layer.weight.detach(), pruned)

    # with (almost) no damping the refit is plain least squares on the kept columns
    w = refit_rows(dense["0.weight"], masks["0.weight"], torch.from_numpy(h), 1e-12).numpy()
    for r in range(8):
        kept = np.flatnonzero(masks["0.weight"][r].numpy())
        sol = np.linalg.lstsq(xc[:, kept], xc @ dense["0.weight"][r].numpy(), rcond=None)[0]
        assert np.abs(w[r, kept] - sol).max() <= 1e-4 * np.abs(sol).max()


def test_conv_rows_follow_the_weight_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g)
    for conv in (nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2),
                 nn.Conv2d(8, 6, 3, padding="same"), nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")):
        rows = layer_rows(conv, x)
        y = conv(x).detach().permute(0, 2, 3, 1).reshape(-1, 6) - conv.bias.detach()
        pred = rows @ conv.weight.detach().reshape(6, -1).T
        assert torch.allclose(pred, y, atol=1e-5)


def _conv_pair_and_batches():
    """Two 3x3 convs (float64) and 4 input batches correlated across channels and pixels (smoothed
    noise): with iid inputs the kept weights are already optimal and there is nothing to restore."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)).double()
    g = torch.Generator().manual_seed(1)
    smooth = torch.randn(8, 8, 3, 3, generator=g).double()
    batches = [nn.functional.conv2d(torch.randn(4, 8, 12, 12, generator=g).double(), smooth) for _ in range(4)]
    return model, batches


def test_conv_refit_keeps_the_nm_mask_and_matches_reference():
    model, batches = _conv_pair_and_batches()
    masks, dense = prune_in_place(model)
    report = restore_layers(model, masks, batches[:3], batches[3:], dense_state=dense, solver="exact")
    assert set(report) == {"0", "2"}
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight.detach()
        assert is_nm_compliant(weight, NM(2, 4))  # groups along C_in at each kernel position
        assert not bool((weight[~masks[f"{name}.weight"]] != 0).any())
        entry = report[name]
        assert entry["error_after"] <= entry["error_before"] or not entry["improved"]
    # first layer: inputs are the raw batches, so a direct reference is easy
    x = torch.cat([layer_rows(model[0], b) for b in batches[:3]]).numpy()
    h = x.T @ x / x.shape[0]
    lam = DEFAULT_DAMP * float(np.mean(np.diag(h)))
    ref = ridge_reference(x, dense["0.weight"].reshape(8, -1).numpy(), masks["0.weight"].reshape(8, -1).numpy(), lam)
    got = model[0].weight.detach().reshape(8, -1).numpy()
    assert report["0"]["improved"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_rolls_back_when_held_out_error_rises():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    model = nn.Sequential(layer)
    g = torch.Generator().manual_seed(2)
    calib_x = torch.randn(400, 16, generator=g)
    calib_x[:, 8:] = 0  # calibration never excites half of the inputs ...
    held_x = torch.randn(400, 16, generator=g)  # ... which the held-out data does
    masks, dense = prune_in_place(model)
    pruned = layer.weight.detach().clone()
    report = restore_layers(model, masks, [calib_x], [held_x], dense_state=dense)
    entry = report["0"]
    assert not entry["improved"] and entry["error_after"] >= entry["error_before"]
    assert torch.equal(layer.weight.detach(), pruned)  # rolled back exactly


def test_relative_error_matches_outputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 12, generator=g, dtype=torch.float64)
    w, d = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    direct = float(((x @ (w - d).T) ** 2).sum() / ((x @ d.T) ** 2).sum())
    assert relative_error(w, d, x.T @ x) == pytest.approx(direct, rel=1e-10)


def test_errors_are_user_errors():
    model = nn.Sequential(nn.Linear(8, 4))
    masks, dense = prune_in_place(model)
    with pytest.raises(MpdeployError):
        restore_layers(model, masks, [], [], dense_state=dense)
    with pytest.raises(MpdeployError):
        restore_layers(model, masks, [torch.randn(4, 8)], [], dense_state=None)
    with pytest.raises(MpdeployError):
        restore_layers(model, {"nope.weight": masks["0.weight"]}, [torch.randn(4, 8)], [], dense_state=dense)


# ---------------------------------------------------------------------------------------------
# end to end through the prune stage
# ---------------------------------------------------------------------------------------------

TIMM_KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2}


def tiny_vit():
    timm = pytest.importorskip("timm")
    from mpdeploy.models.spec import LoadedModel

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    return LoadedModel(module, input_shape=(1, 32, 32), name="vit-tiny-digits",
                       source={"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": TIMM_KWARGS})


def check_pruned(result) -> int:
    checked = 0
    for r in result.layers:
        if r["pattern"]:
            weight = result.model.get_submodule(r["name"]).weight.detach()
            assert is_nm_compliant(weight, NM(2, 4))
            assert not bool((weight[~result.masks[r["param"]]] != 0).any())
            checked += 1
    assert checked
    return checked


def test_prune_model_permute_and_restore(monkeypatch):
    """prune_model(permute=True, restore=True) on a small ViT keeps every pruned layer exactly N:M."""
    from mpdeploy.sparsity.permute import search as permute_search
    from mpdeploy.prune.stage import PruneConfig, prune_model

    monkeypatch.setattr(permute_search, "DEFAULT_WORK", 4e6)
    loaded = tiny_vit()
    config = PruneConfig(permute=True, restore=True, calib="digits", saliency="wanda", calib_batches=2)
    result = prune_model(loaded, config)
    report = {r["name"]: r["restore"] for r in result.layers if r["restore"]}
    assert set(report) == {r["name"] for r in result.layers if r["pattern"]}
    for entry in report.values():
        assert entry["improved"] == (entry["error_after"] < entry["error_before"])
    assert any(entry["improved"] for entry in report.values())
    assert any((r["permutation"] or {}).get("permuted") for r in result.layers)
    check_pruned(result)


# ---------------------------------------------------------------------------------------------
# the OBS (SparseGPT-form) solver
# ---------------------------------------------------------------------------------------------


def test_upper_inverse_factor_is_the_cholesky_factor_of_the_inverse():
    from mpdeploy.sparsity.obs import upper_inverse_factor

    x = correlated_inputs(300, 24, seed=3).double()
    h = x.T @ x / 300
    u = upper_inverse_factor(h, 0.1).double()
    assert torch.equal(u, torch.triu(u))
    ref = torch.linalg.inv(h + 0.1 * torch.eye(24, dtype=torch.float64))
    assert torch.allclose(u.T @ u, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_obs_refit_is_exact_when_the_removed_columns_come_first():
    """OBS visits columns left to right: removing only leading columns leaves one optimal update of the
    rest, the least squares min (w'-w)^T (H + lam I) (w'-w) with w'_P = 0."""
    from mpdeploy.sparsity.restore import refit_obs

    g = torch.Generator().manual_seed(4)
    x = correlated_inputs(500, 32, seed=4).double()
    h = x.T @ x / 500
    dense = torch.randn(6, 32, generator=g, dtype=torch.float64)
    keep = torch.zeros(6, 32, dtype=torch.bool)
    keep[:, 12:] = True
    lam = 0.05
    got = refit_obs(dense, keep, h, lam, cg_steps=0)
    hd = h + lam * torch.eye(32, dtype=torch.float64)
    ref = torch.zeros_like(dense)
    ref[:, 12:] = torch.linalg.solve(hd[12:, 12:], (dense @ hd)[:, 12:].T).T
    assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(refit_obs(dense, torch.ones_like(keep), h, lam, cg_steps=0).float(), dense.float())


def test_obs_refit_is_close_to_exact_least_squares_on_output_error():
    """On correlated inputs the one-factor OBS refit loses at most a few percent of output error to the
    exact per-row solve, and both beat the plain masked weights by far."""
    from mpdeploy.sparsity.restore import refit_obs

    g = torch.Generator().manual_seed(5)
    x = correlated_inputs(4000, 64, seed=5).double()
    h_fit, h_held = x[:3000].T @ x[:3000] / 3000, x[3000:].T @ x[3000:] / 1000
    dense = torch.randn(32, 64, generator=g, dtype=torch.float64)
    keep = compute_mask(dense, NM(2, 4), "magnitude")
    lam = DEFAULT_DAMP * float(torch.diagonal(h_fit).mean())
    err_masked = relative_error(dense * keep, dense, h_held)
    err_exact = relative_error(refit_rows(dense, keep, h_fit, lam), dense, h_held)
    obs = refit_obs(dense, keep, h_fit, lam)
    err_obs = relative_error(obs, dense, h_held)
    assert torch.equal(obs != 0, keep)
    assert err_exact < 0.8 * err_masked
    assert err_obs <= 1.05 * err_exact


def test_obs_nm_selection_is_compliant_and_beats_magnitude():
    from mpdeploy.sparsity.obs import obs_sweep, upper_inverse_factor

    g = torch.Generator().manual_seed(6)
    x = correlated_inputs(3000, 64, seed=6)
    x[:, ::5] *= 6  # a few outlier input columns, as after LayerNorm in ViTs
    h = (x.T @ x / 3000).double()
    dense = torch.randn(16, 64, generator=g)
    weights, keep = obs_sweep(dense, upper_inverse_factor(h, 0.01 * float(torch.diagonal(h).mean())), pattern=NM(2, 4))
    assert is_nm_compliant(weights, NM(2, 4)) and int(keep.sum()) == 16 * 32
    assert torch.equal(weights != 0, keep)
    magnitude = dense * compute_mask(dense, NM(2, 4), "magnitude")
    assert relative_error(weights, dense, h) < 0.7 * relative_error(magnitude, dense, h)


def test_one_pass_obs_restore_keeps_masks_and_lowers_error():
    model, batches = _conv_pair_and_batches()
    masks, dense = prune_in_place(model)
    exact_model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)).double()
    exact_model.load_state_dict(model.state_dict())
    obs = restore_layers(model, masks, batches[:3], batches[3:], dense_state=dense)
    exact = restore_layers(exact_model, masks, batches[:3], batches[3:], dense_state=dense, solver="exact")
    assert list(obs) == ["0", "2"] and obs["0"]["solver"] == "obs"
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight.detach()
        assert is_nm_compliant(weight, NM(2, 4))
        assert torch.equal(weight != 0, masks[f"{name}.weight"])
        assert obs[name]["improved"]
    assert obs["0"]["error_after"] <= 1.05 * exact["0"]["error_after"]


# ---------------------------------------------------------------------------------------------
# restore from the covariances the mask selection accumulated (one Hessian per layer, shared)
# ---------------------------------------------------------------------------------------------


def one_layer_model(kind: str):
    """One prunable layer: its inputs are the same with or without pruning, so the sequential pass and
    the shared covariance must give the same refit (the known answer)."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(32, 12)), list(correlated_inputs(4 * 256, 32, seed=5).split(256))
    # Channels mixed by one matrix (correlated inputs, so a refit has something to fix), 3 images a batch.
    pixels = correlated_inputs(12 * 7 * 7, 8, seed=5).reshape(12, 7, 7, 8).permute(0, 3, 1, 2)
    return nn.Sequential(nn.Conv2d(8, 6, 3, padding=1)), list(pixels.contiguous().split(3))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_shared_hessian_restore_matches_the_sequential_pass(kind):
    """Magnitude masks (the selection left the kept weights as they were): the refit from the shared
    covariances equals the one-pass sequential restore's (float32 solver: within 1e-5 of the weight
    scale; the stored covariance is float32 where the pass keeps float64), and the same verdicts."""
    from mpdeploy.sparsity.restore import restore_from_stats
    from mpdeploy.sparsity.saliency import collect_stats

    model, batches = one_layer_model(kind)
    stats = collect_stats(model, ["0"], batches[:3], batches[3:], "sparsegpt")
    shared_model, _ = one_layer_model(kind)
    masks, dense = prune_in_place(model)
    shared_masks, _ = prune_in_place(shared_model)
    sequential = restore_layers(model, masks, batches[:3], batches[3:], dense_state=dense)["0"]
    shared = restore_from_stats(shared_model, shared_masks, {}, stats, dense_state=dense)["0"]
    assert torch.equal(masks["0.weight"], shared_masks["0.weight"])
    scale = float(dense["0.weight"].abs().max())
    assert float((model[0].weight - shared_model[0].weight).detach().abs().max()) <= 1e-5 * scale
    assert shared["improved"] and sequential["improved"]  # a refit the known answer adopts, not a rollback
    assert shared["error_after"] == pytest.approx(sequential["error_after"], rel=1e-4)
    assert shared["error_before"] == pytest.approx(sequential["error_before"], rel=1e-5)
    assert shared["scheme"] == "shared-hessian" and shared["lambda"] == pytest.approx(sequential["lambda"], rel=1e-6)
    assert not bool((shared_model[0].weight.detach()[~shared_masks["0.weight"]] != 0).any())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparsegpt_weights_are_bit_for_bit_the_restore_refit(kind):
    """Why restore skips a layer SparseGPT chose: the mask-fixed refit on the same covariance
    (refit_obs: OBS sweep inside the mask + CG) reproduces the selection's weights exactly."""
    from mpdeploy.sparsity.restore import refit_obs
    from mpdeploy.sparsity.saliency import choose_mask, collect_stats

    model, batches = one_layer_model(kind)
    stats = collect_stats(model, ["0"], batches[:3], batches[3:], "sparsegpt")["0"]
    weight = model[0].weight
    choice = choose_mask(weight, NM(2, 4), "sparsegpt", stats)
    assert choice.refit
    h = stats.hessian()
    lam = DEFAULT_DAMP * float(torch.diagonal(h).mean())
    dense = weight.detach().reshape(weight.shape[0], -1)
    refit = refit_obs(dense, choice.mask.reshape(dense.shape), h, lam, shape=tuple(weight.shape))
    assert torch.equal(refit.float().reshape(weight.shape), choice.weight)


def test_prune_default_saliency_restore_shares_the_selection_hessians():
    """prune_model(saliency=auto, restore=True): no second pass; layers SparseGPT refit are reported as
    such (before = after = the selection's held-out error); every layer stays exactly N:M."""
    from mpdeploy.prune.stage import PruneConfig, prune_model

    loaded = tiny_vit()
    result = prune_model(loaded, PruneConfig(restore=True, calib="digits", saliency="auto", calib_batches=2))
    check_pruned(result)
    for r in (r for r in result.layers if r["pattern"]):
        entry = r["restore"]
        assert entry["scheme"] == "shared-hessian" and entry["judged_on"] == "held_out"
        if r["saliency_chosen"] == "sparsegpt":
            assert entry["error_before"] == entry["error_after"] and not entry["improved"]
            assert "already refit" in entry["reason"]
        else:
            assert entry["improved"] == (entry["error_after"] < entry["error_before"])


def unfold_rows(conv: nn.Conv2d, x: torch.Tensor, max_rows: int | None, seed: int) -> torch.Tensor:
    """The reference: F.unfold of the whole input, then a randperm sample of its rows."""
    import torch.nn.functional as F

    from mpdeploy.sparsity.restore import conv_input_padding

    x, padding = conv_input_padding(conv, x)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if max_rows and rows.shape[0] > max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    return rows


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, padding=1),
    nn.Conv2d(8, 6, (3, 5), dilation=(2, 1), padding=(2, 1)), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding="same"),
    nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), nn.Conv2d(8, 6, 4, stride=3)], ids=str)
def test_conv_rows_from_strided_views_equal_unfold_exactly(conv):
    """The sampled rows are the rows F.unfold + randperm gave (bit for bit), built without the full unfold."""
    x = torch.randn(3, 8, 17, 15, generator=torch.Generator().manual_seed(4))
    for max_rows in (None, 50):
        ours = layer_rows(conv, x, max_rows, torch.Generator().manual_seed(1))
        assert torch.equal(ours, unfold_rows(conv, x, max_rows, 1))


def test_least_relative_error_is_the_minimum_of_the_full_errors():
    """The bounded sums stop early on losers and still answer what the full errors answer, whichever
    candidate is summed whole first."""
    from mpdeploy.sparsity.restore import least_relative_error, relative_errors

    g = torch.Generator().manual_seed(5)
    x = correlated_inputs(300, 40, seed=5)
    h = x.T @ x / 300
    dense = torch.randn(24, 40, generator=g)
    near = dense + 0.01 * torch.randn(24, 40, generator=g)
    far = dense * (torch.rand(24, 40, generator=g) > 0.5)
    mid = dense + 0.3 * torch.randn(24, 40, generator=g)
    for weights in ([far, mid, near], [near, far, mid], [mid, near, far], [far, mid]):
        errors = relative_errors(weights, dense, h)
        best = min(range(len(weights)), key=errors.__getitem__)
        for first in range(len(weights)):
            index, error = least_relative_error(weights, dense, h, first=first)
            assert index == best
            assert error == pytest.approx(errors[best], rel=1e-5)
    # all errors zero (a zero layer): the first candidate, as the plain minimum answers
    assert least_relative_error([far, mid], torch.zeros(24, 40), h, first=1) == (0, 0.0)

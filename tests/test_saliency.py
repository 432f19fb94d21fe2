"""Saliency registry and the calibration-aware criteria (sparsegpt, auto)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM, is_nm_compliant
from mpdeploy.sparsity.restore import relative_error
from mpdeploy.sparsity.saliency import (
    DEFAULT_CALIB_SALIENCY,
    choose_mask,
    collect_stats,
    get_saliency,
    list_saliencies,
    register_saliency,
)
from mpdeploy.sparsity.stats import MaskChoice


def outlier_batches(k: int, seed: int, n: int = 4) -> list[torch.Tensor]:
    """Correlated inputs with a few large columns (as after LayerNorm in a ViT)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.ones(k)
    scale[::7] = 8.0
    return [(torch.randn(64, k, generator=g) @ mix) * scale for _ in range(n)]


def test_registry_lists_builtins_and_accepts_new_criteria():
    assert {"magnitude", "wanda", "block-cost", "sparsegpt", "auto"} <= set(list_saliencies())
    assert DEFAULT_CALIB_SALIENCY in list_saliencies()
    with pytest.raises(MpdeployError, match="unknown saliency"):
        get_saliency("nope")

    @register_saliency("test-first-n", help="keep the first N of each group")
    def first_n(weight, pattern, stats=None):
        keep = torch.zeros(weight.shape[0], weight.shape[1] // pattern.m, pattern.m, dtype=torch.bool)
        keep[..., : pattern.n] = True
        return MaskChoice(keep.reshape(weight.shape))

    try:
        assert "test-first-n" in list_saliencies()
        mask = choose_mask(torch.randn(4, 8), NM(2, 4), "test-first-n").mask
        assert mask[:, [0, 1, 4, 5]].all() and not mask[:, [2, 3, 6, 7]].any()
        with pytest.raises(ValueError):
            register_saliency("test-first-n")(first_n)
    finally:
        from mpdeploy.sparsity import saliency

        saliency._SALIENCIES.pop("test-first-n")


def test_cli_checks_names_against_the_registry():
    """The CLI does not import the registries for --help (torch-free); the config step checks the names."""
    import argparse

    from mpdeploy.commands.prune import add_prune_arguments, prune_config_from_args
    from mpdeploy.core.errors import MpdeployError

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    assert prune_config_from_args(parser.parse_args(["--saliency", "sparsegpt", "--calib", "digits"])).saliency == "sparsegpt"
    with pytest.raises(MpdeployError, match="unknown saliency 'nope'; choose one of .*sparsegpt"):
        prune_config_from_args(parser.parse_args(["--saliency", "nope"]))
    with pytest.raises(MpdeployError, match="unknown budget 'nope'; choose one of .*damage"):
        prune_config_from_args(parser.parse_args(["--budget", "nope"]))


def test_sparsegpt_and_auto_beat_magnitude_on_layer_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(56, 32))
    batches = outlier_batches(56, seed=1)
    calib, held = batches[:3], batches[3:]
    stats = collect_stats(model, ["0"], calib, held, "auto")["0"]
    weight = model[0].weight
    dense = weight.detach().double()
    judge = stats.hessian(held=True)
    magnitude = choose_mask(weight, NM(2, 4), "magnitude")
    err_mag = relative_error(dense * magnitude.mask, dense, judge)
    sgpt = choose_mask(weight, NM(2, 4), "sparsegpt", stats)
    assert is_nm_compliant(sgpt.weight, NM(2, 4))
    assert not bool((sgpt.weight[~sgpt.mask] != 0).any())
    assert sgpt.error == pytest.approx(relative_error(sgpt.weight, dense, judge), rel=1e-6)
    assert sgpt.error < 0.5 * err_mag
    auto = choose_mask(weight, NM(2, 4), "auto", stats)
    assert auto.chosen in ("magnitude", "wanda", "sparsegpt") and auto.error <= err_mag
    assert auto.error <= sgpt.error + 1e-12


def test_sparsegpt_conv_groups_run_along_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1))
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 8, 6, 6, generator=g) for _ in range(3)]
    stats = collect_stats(model, ["0"], batches[:2], batches[2:], "sparsegpt")["0"]
    choice = choose_mask(model[0].weight, NM(2, 4), "sparsegpt", stats)
    assert choice.mask.shape == model[0].weight.shape
    assert is_nm_compliant(choice.weight, NM(2, 4))  # groups along C_in at each kernel position
    assert int(choice.mask.sum()) == model[0].weight.numel() // 2


def test_calibration_criteria_need_calibration_data():
    weight = torch.randn(4, 8)
    for name in ("wanda", "sparsegpt", "auto"):
        with pytest.raises(MpdeployError, match="calib"):
            choose_mask(weight, NM(2, 4), name, None)


@pytest.mark.slow
@pytest.mark.parametrize("zoo_name", ["digits_vit", "digits_cnn"])
def test_default_calib_saliency_never_loses_to_magnitude_on_the_zoo(zoo_name):
    """Top-1 on the digits test split, uniform 2:4, zero fine-tuning: the --calib default >= magnitude."""
    from mpdeploy.prune.stage import PruneConfig, prune_model
    from mpdeploy.models.zoo import digits_top1, load_zoo_model

    top1 = {}
    for saliency in ("magnitude", DEFAULT_CALIB_SALIENCY):
        loaded = load_zoo_model(zoo_name)
        result = prune_model(loaded, PruneConfig(calib="digits", budget="uniform", saliency=saliency))
        top1[saliency] = digits_top1(result.model, loaded.input_shape)
    assert top1[DEFAULT_CALIB_SALIENCY] >= top1["magnitude"], top1


def test_layers_without_calibration_inputs_fall_back_to_magnitude():
    from mpdeploy.sparsity.stats import InputStats

    weight = torch.randn(4, 8)
    for name in ("sparsegpt", "auto"):
        choice = choose_mask(weight, NM(2, 4), name, InputStats())
        assert torch.equal(choice.mask, choose_mask(weight, NM(2, 4), "magnitude").mask)


def test_cli_help_names_every_registered_saliency_and_budget():
    """The CLI lists the registries' names in its help without importing them (torch-free --help)."""
    import argparse

    from mpdeploy.sparsity.budgets import list_budgets
    from mpdeploy.commands.prune import add_prune_arguments
    from mpdeploy.sparsity.saliency import list_saliencies

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert all(name in helps["saliency"] for name in list_saliencies())
    assert all(name in helps["budget"] for name in list_budgets())


# ---------------------------------------------------------------------------------------------
# the one-pass statistics and the shared judge give the same answers as the separate passes
# ---------------------------------------------------------------------------------------------


def separate_pass_stats(model, names, calib, held, rows_per_image, group_sizes=()):
    """The statistics the plain way: column statistics in one pass, then one pass per batch list for
    the covariances, each a full float64 X^T X of the sampled rows (row sampling from one generator
    seeded 0, at most `rows_per_image(module)` rows per image)."""
    from mpdeploy.sparsity.layers import capture_inputs
    from mpdeploy.sparsity.restore import layer_rows
    from mpdeploy.sparsity.stats import InputStats

    stats = {n: InputStats() for n in names}
    capture_inputs(model, names, calib, lambda name, x: stats[name].update(x, group_sizes))
    gen = torch.Generator().manual_seed(0)
    for which, batches in (("gram", calib), ("held_gram", held)):
        def hook(module, inputs, output, name, which=which):
            rows = layer_rows(module, inputs[0], rows_per_image(module) * len(inputs[0]), gen).double()
            st = stats[name]
            h = rows.T @ rows
            setattr(st, which, h if getattr(st, which) is None else getattr(st, which) + h)
            setattr(st, "gram_rows" if which == "gram" else "held_rows",
                    getattr(st, "gram_rows" if which == "gram" else "held_rows") + rows.shape[0])
        handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n, hook=hook: hook(m, i, o, n))
                   for n in names]
        with torch.no_grad():
            for batch in batches:
                model(batch)
        for handle in handles:
            handle.remove()
    return stats


def test_one_pass_stats_equal_the_separate_passes():
    """A wide conv with more positions per image than its covariance takes, so the row sampler draws;
    a narrow one that takes them all; a conv and a Linear wider than GRAM_BLOCK, so the block-triangular
    accumulation and its completion run: the same rows as the plain passes, and the same sums up to
    float32 rounding."""
    from mpdeploy.sparsity.saliency import HESSIAN_ROWS_PER_IMAGE, HESSIAN_WIDE_K, hessian_rows_per_image
    from mpdeploy.sparsity.stats import GRAM_BLOCK

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(392, 8))
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 4, 24, 24, generator=g) for _ in range(3)]  # 576 positions per image
    names = ["0", "2", "5"]
    assert model[2].weight[0].numel() >= HESSIAN_WIDE_K and model[5].in_features > GRAM_BLOCK
    new = collect_stats(model, names, batches[:2], batches[2:], "auto", (4,))
    old = separate_pass_stats(model, names, batches[:2], batches[2:],
                              lambda module: hessian_rows_per_image(module.weight[0].numel()), (4,))
    for name in names:
        assert torch.allclose(new[name].col_sq_sum, old[name].col_sq_sum, rtol=1e-6, atol=0)
        for field in ("gram", "held_gram"):
            got, want = getattr(new[name], field), getattr(old[name], field)
            assert got.dtype == torch.float32 and torch.equal(got, got.T), (name, field)  # completed exactly
            assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max()), (name, field)
        assert torch.equal(new[name].group_cov[4], old[name].group_cov[4])
        assert (new[name].rows, new[name].gram_rows, new[name].held_rows) == \
               (old[name].rows, old[name].gram_rows, old[name].held_rows)
        assert new[name].rows_match is True
    assert new["2"].gram_rows == 2 * 3 * HESSIAN_ROWS_PER_IMAGE  # K = 864: 128 of 576 positions per image
    assert new["0"].gram_rows == 2 * 3 * 576  # K = 36: every position
    assert new["5"].gram_rows == 2 * 3  # one row per image: nothing to sample


def test_narrow_layers_take_more_rows_for_the_same_work():
    from mpdeploy.sparsity.saliency import HESSIAN_ROWS_PER_IMAGE, HESSIAN_WIDE_K, hessian_rows_per_image

    assert hessian_rows_per_image(3072) == hessian_rows_per_image(HESSIAN_WIDE_K) == HESSIAN_ROWS_PER_IMAGE
    assert hessian_rows_per_image(HESSIAN_WIDE_K // 2) == 4 * HESSIAN_ROWS_PER_IMAGE
    assert hessian_rows_per_image(576, 128) == 227  # ResNet-50's layer1 3x3: 128 * (768 / 576)^2


@pytest.mark.parametrize("k", [100, 256, 300, 777])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_triangular_gram_equals_the_full_product(k, dtype):
    from mpdeploy.sparsity.stats import add_gram_, symmetrize_

    g = torch.Generator().manual_seed(k)
    parts = [torch.randn(n, k, generator=g, dtype=dtype) for n in (50, 1, 400)]
    acc = None
    for part in parts:
        acc = add_gram_(acc, part)
    acc = symmetrize_(acc)
    full = torch.cat(parts).double()
    want = full.T @ full
    assert acc.dtype == dtype and torch.equal(acc, acc.T)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((acc.double() - want).abs().max()) <= tol * float(want.abs().max())


def float64_auto(weight, pattern, stats):
    """`auto` judged independently: each candidate's held-out error on its own, in float64."""
    dense = weight.detach().reshape(weight.shape[0], -1).double()
    judge = stats.hessian(held=True).double()
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        choice = choose_mask(weight, pattern, name, stats)
        new = choice.weight if choice.weight is not None else weight.detach() * choice.mask
        errors[name] = relative_error(new.reshape(dense.shape).double(), dense, judge)
    return errors


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_auto_picks_the_least_held_out_error_judged_in_float64(kind):
    """auto judges every candidate in one float32 product on one denominator: it picks what a float64
    judgement of each candidate on its own picks, with the same error to float32 precision."""
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(56, 32))
        batches = outlier_batches(56, seed=1)
    else:
        model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1))
        g = torch.Generator().manual_seed(2)
        batches = [torch.randn(4, 8, 6, 6, generator=g) for _ in range(4)]
    stats = collect_stats(model, ["0"], batches[:3], batches[3:], "auto")["0"]
    for pattern in (NM(2, 4), NM(1, 4), NM(4, 8)):
        errors = float64_auto(model[0].weight, pattern, stats)
        best, second = sorted(errors.values())[:2]
        assert second > best * (1 + 1e-4)  # no near tie: float32 rounding cannot flip the choice
        auto = choose_mask(model[0].weight, pattern, "auto", stats)
        assert auto.chosen == min(errors, key=errors.get)
        assert auto.error == pytest.approx(errors[auto.chosen], rel=1e-5)

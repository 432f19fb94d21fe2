"""Saliency registry and the calibration-aware criteria (sparsegpt, auto)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpdeploy.errors import MpdeployError
from mpdeploy.patterns import NM, is_nm_compliant
from mpdeploy.restore import relative_error
from mpdeploy.saliency import (
    DEFAULT_CALIB_SALIENCY,
    MaskChoice,
    choose_mask,
    collect_stats,
    get_saliency,
    list_saliencies,
    register_saliency,
)


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
        from mpdeploy import saliency

        saliency._SALIENCIES.pop("test-first-n")


def test_cli_checks_names_against_the_registry():
    """The CLI does not import the registries for --help (torch-free); the config step checks the names."""
    import argparse

    from mpdeploy.commands.prune import add_prune_arguments, prune_config_from_args
    from mpdeploy.errors import MpdeployError

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
    from mpdeploy.prune import PruneConfig, prune_model
    from mpdeploy.zoo import digits_top1, load_zoo_model

    top1 = {}
    for saliency in ("magnitude", DEFAULT_CALIB_SALIENCY):
        loaded = load_zoo_model(zoo_name)
        result = prune_model(loaded, PruneConfig(calib="digits", budget="uniform", saliency=saliency))
        top1[saliency] = digits_top1(result.model, loaded.input_shape)
    assert top1[DEFAULT_CALIB_SALIENCY] >= top1["magnitude"], top1


def test_layers_without_calibration_inputs_fall_back_to_magnitude():
    from mpdeploy.saliency import InputStats

    weight = torch.randn(4, 8)
    for name in ("sparsegpt", "auto"):
        choice = choose_mask(weight, NM(2, 4), name, InputStats())
        assert torch.equal(choice.mask, choose_mask(weight, NM(2, 4), "magnitude").mask)


def test_cli_help_names_every_registered_saliency_and_budget():
    """The CLI lists the registries' names in its help without importing them (torch-free --help)."""
    import argparse

    from mpdeploy.budgets import list_budgets
    from mpdeploy.commands.prune import add_prune_arguments
    from mpdeploy.saliency import list_saliencies

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert all(name in helps["saliency"] for name in list_saliencies())
    assert all(name in helps["budget"] for name in list_budgets())

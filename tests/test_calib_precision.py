"""The calibration forward passes' dtype: when bfloat16 is taken, and that the statistics stay float32."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.calib_precision import BF16_MIN_MACS, resolve_forward_dtype
from mpdeploy.sparsity.saliency import collect_stats


@pytest.mark.parametrize("requested, macs, native, want", [
    ("auto", BF16_MIN_MACS, True, "bfloat16"),
    ("auto", 17_600_000_000, True, "bfloat16"),  # ViT-B/16
    ("auto", BF16_MIN_MACS - 1, True, "float32"),  # the zoo's models: bit-stable across CPUs
    ("auto", 17_600_000_000, False, "float32"),  # emulated bfloat16 is slower than float32
    ("float32", 17_600_000_000, True, "float32"),
    ("bfloat16", 1_000, False, "bfloat16"),  # asked for: honoured
])
def test_auto_takes_bfloat16_only_for_large_models_on_native_hardware(requested, macs, native, want):
    dtype, why = resolve_forward_dtype(requested, macs, native)
    assert dtype == want
    assert why.startswith("auto:" if requested == "auto" else f"--calib-dtype {requested}")


def test_an_unknown_dtype_is_one_line():
    from mpdeploy.commands.prune import add_prune_arguments, prune_config_from_args

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    assert prune_config_from_args(parser.parse_args(["--calib", "digits"])).calib_dtype == "auto"
    with pytest.raises(MpdeployError, match="--calib-dtype 'fp16' is not one of auto, float32, bfloat16"):
        prune_config_from_args(parser.parse_args(["--calib", "digits", "--calib-dtype", "fp16"]))


def test_bfloat16_forward_keeps_float32_statistics_close_to_the_float32_pass():
    """A conv and a Linear fed through a bfloat16 forward: full-precision statistics within bfloat16's rounding
    of the float32 pass (and not equal to it: the autocast ran), the im2col check still passes (it runs
    in float32), so restore keeps these layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    names = ["0", "2", "5"]
    ref = collect_stats(model, names, batches[:2], batches[2:], "auto")
    low = collect_stats(model, names, batches[:2], batches[2:], "auto", forward_dtype="bfloat16")
    for name in names:
        for field in ("gram", "held_gram", "col_sq_sum"):
            got, want = getattr(low[name], field), getattr(ref[name], field)
            assert got.dtype == want.dtype and got.dtype != torch.bfloat16, (name, field)
            gap = float((got - want).norm() / want.norm())
            assert gap < 2e-2, (name, field, gap)
        assert low[name].rows_match is True, name
    # the first layer's input is the images themselves; every later one went through bfloat16 GEMMs
    assert not torch.equal(low["2"].gram, ref["2"].gram)


def test_the_manifest_says_which_dtype_ran_and_why(tmp_path):
    from mpdeploy.models.zoo import load_zoo_model
    from mpdeploy.prune.stage import PruneConfig, prune_model

    result = prune_model(load_zoo_model("digits_vit"), PruneConfig(saliency="wanda", calib="digits", calib_batches=2))
    calibration = result.extra["calibration"]
    assert calibration["forward_dtype"] == "float32"
    assert calibration["forward_dtype_reason"].startswith("auto: 0.")  # well under 1 GMAC per image


@pytest.mark.parametrize("arch, fmt", [("SmallCNN", "torchscript"), ("SmallViT", "pt2")])
def test_bfloat16_calibration_on_a_users_saved_model_matches_the_float32_prune(tmp_path, arch, fmt):
    """A model not in timm, saved the way users save it, with their own `.npz`: `prune --restore
    --calib-dtype bfloat16` records bfloat16, keeps every layer's restore decision, and each held-out
    layer error is within 10% of the float32 prune's (about 2% measured)."""
    import json

    import numpy as np
    import own_archs

    from mpdeploy.cli import main as cli_main

    torch.manual_seed(0)
    model = getattr(own_archs, arch)(in_chans=3).eval()
    if fmt == "torchscript":
        path, flags = tmp_path / "model.ts.pt", ["--trust-pickle", "--input-shape", "3,16,16"]
        torch.jit.save(torch.jit.script(model), path)
    else:
        path, flags = tmp_path / "model.pt2", ["--trust-pickle"]
        program = torch.export.export(model, (torch.randn(2, 3, 16, 16),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
    data = tmp_path / "x.npz"
    np.savez(data, images=np.random.default_rng(0).standard_normal((48, 3, 16, 16)).astype(np.float32))
    restore = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli_main(["prune", str(path), "--calib", str(data), "--restore", "--calib-batches", "4",
                         "--calib-batch-size", "8", "--calib-dtype", dtype, "--out", str(out), *flags]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["calibration"]["forward_dtype"] == dtype
        restore[dtype] = {layer["name"]: layer["restore"] for layer in manifest["layers"] if layer.get("restore")}
    assert restore["float32"] and restore["bfloat16"].keys() == restore["float32"].keys()
    for name, want in restore["float32"].items():
        got = restore["bfloat16"][name]
        assert got.get("reason") == want.get("reason"), name
        assert want["error_after"] > 0 and abs(got["error_after"] / want["error_after"] - 1) < 0.10, (name, got, want)

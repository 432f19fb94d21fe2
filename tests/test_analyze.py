"""The analyze stage on small random-init timm models: artifact contents, known sigma, atomicity."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mpdeploy.analyze.stage import SCHEMA, AnalyzeConfig, analyze
from mpdeploy.core.errors import MpdeployError

timm = pytest.importorskip("timm")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prunable_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def _set_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(weight)


def _planted(rows: int, cols: int, rank: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Noise plus a rank-r signal 4x above the detection threshold (normalized units)."""
    n = max(rows, cols)
    gamma = min(rows, cols) / n
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen))
    return sigma * torch.randn(rows, cols, generator=gen) + 4 * gamma**0.25 * sigma * math.sqrt(n) * u @ v.T


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    _set_weight(model, "blocks.3.mlp.fc1", 0.037 * torch.randn(768, 192, generator=gen))
    _set_weight(model, "blocks.5.attn.proj", _planted(192, 192, 3, 0.02, gen))
    calls = []
    out = tmp_path_factory.mktemp("vit") / "analyze"
    result = analyze(model, AnalyzeConfig(max_layer_plots=8), out, progress=lambda *a: calls.append(a))
    return model, result, calls


def test_vit_spectra_json(vit_run):
    model, out, calls = vit_run
    spectra = json.loads((out / "spectra.json").read_text())
    assert spectra["schema"] == SCHEMA
    layers = {rec["name"]: rec for rec in spectra["layers"]}
    assert list(layers) == _prunable_names(model)
    for rec in layers.values():
        assert rec["fit"] is not None and rec["skipped"] is None
        assert rec["weight_shape"] == list(model.get_submodule(rec["name"]).weight.shape)
    assert layers["patch_embed.proj"]["matrix_shape"] == [192, 768]  # conv unfolded to C_in*kh*kw
    assert layers["blocks.0.mlp.fc1"]["fit"]["shape"] == [768, 192]
    # Pure noise of known sigma -> sigma_hat within 2%.
    assert layers["blocks.3.mlp.fc1"]["fit"]["sigma_hat"] == pytest.approx(0.037, rel=0.02)
    assert layers["blocks.3.mlp.fc1"]["fit"]["spikes"] == 0
    assert layers["blocks.5.attn.proj"]["fit"]["spikes"] == 3
    assert spectra["summary"]["fitted"] == len(layers)
    assert spectra["summary"]["total_spikes"] >= 3
    # Progress: one call per layer, in order.
    assert calls == [(i + 1, len(layers), name) for i, name in enumerate(layers)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "analyze" and "spectra.json" in manifest["files"]


def test_vit_plots_limited(vit_run):
    _, out, _ = vit_run
    layers = json.loads((out / "spectra.json").read_text())["layers"]
    _assert_png(out / "summary.png")
    plotted = [rec["plot"] for rec in layers if rec["plot"] is not None]
    assert len(plotted) == 8 and plotted == [rec["plot"] for rec in layers[:8]]  # the first 8, in order
    for rel in plotted:
        _assert_png(out / rel)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "plots").glob("*.png")) == sorted(plotted)


def test_resnet_conv_noise_and_all_plots(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    gen = torch.Generator().manual_seed(2)
    _set_weight(model, "layer3.0.conv2", 0.05 * torch.randn(256, 256, 3, 3, generator=gen))
    out = analyze(model, AnalyzeConfig(), tmp_path / "r18")
    spectra = json.loads((out / "spectra.json").read_text())
    layers = {rec["name"]: rec for rec in spectra["layers"]}
    assert list(layers) == _prunable_names(model)
    rec = layers["layer3.0.conv2"]
    assert rec["kind"] == "conv" and rec["matrix_shape"] == [256, 2304]
    assert rec["fit"]["sigma_hat"] == pytest.approx(0.05, rel=0.02)
    assert layers["fc"]["kind"] == "linear" and layers["fc"]["is_head"]
    assert len(list((out / "plots").glob("*.png"))) == len(layers)
    for rec in layers.values():
        _assert_png(out / rec["plot"])
    _assert_png(out / "summary.png")


def test_grouped_and_depthwise_convs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(32, 64, 3, groups=2),  # two 32 x 144 matrices: fitted per group
        nn.Conv2d(64, 64, 3, groups=64),  # depthwise: 1 x 9 per group, too small
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    out = analyze(model, AnalyzeConfig(plots=False), tmp_path / "g")
    layers = json.loads((out / "spectra.json").read_text())["layers"]
    grouped, depthwise, linear = layers
    assert grouped["groups"] == 2 and grouped["matrix_shape"] == [32, 144]
    assert grouped["fit"] is not None and "2 groups" in grouped["fit"]["aggregate"]
    assert depthwise["fit"] is None and "too small" in depthwise["skipped"]
    assert linear["fit"] is not None
    assert not (out / "plots").exists() and not (out / "summary.png").exists()


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_interrupted_analyze_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])

    def boom(done, total, name):
        if done == 4:
            raise KeyboardInterrupt

    out = tmp_path / "an"
    with pytest.raises(KeyboardInterrupt):
        analyze(model, AnalyzeConfig(), out, progress=boom)
    assert not out.exists()
    assert _leftovers(tmp_path, "an") == []

    # An earlier finished folder survives an interrupted re-run untouched, and a finished re-run
    # replaces it.
    small = nn.Sequential(nn.Linear(64, 32))
    analyze(small, AnalyzeConfig(plots=False), out)
    before = (out / "spectra.json").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        analyze(model, AnalyzeConfig(), out, progress=boom)
    assert (out / "spectra.json").read_bytes() == before
    assert _leftovers(tmp_path, "an") == []
    analyze(nn.Sequential(nn.Linear(48, 32)), AnalyzeConfig(plots=False), out)
    assert json.loads((out / "spectra.json").read_text())["layers"][0]["weight_shape"] == [32, 48]
    assert _leftovers(tmp_path, "an") == []


def test_refuses_to_replace_unrelated_folder(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(MpdeployError, match="not an analyze output"):
        analyze(nn.Sequential(nn.Linear(64, 32)), AnalyzeConfig(plots=False), target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_cli_command(tmp_path):
    pytest.importorskip("rich")
    from mpdeploy.commands import analyze as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["timm:resnet18", "--weights", "random", "--out", str(out), "--no-plots"])
    assert command.main(args) == 0
    spectra = json.loads((out / "spectra.json").read_text())
    assert len(spectra["layers"]) == 21

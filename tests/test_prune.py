import json
import os

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mpdeploy.core.errors import MpdeployError
from mpdeploy.models.spec import LoadedModel, ModelSpec
from mpdeploy.models.load import load_model
from mpdeploy.sparsity.patterns import NM, is_nm_compliant, reduction_view
from mpdeploy.prune.stage import PruneConfig, prune, prune_model
from mpdeploy.sparsity.pruned import load_pruned


def _independent_macs(model: nn.Module, input_shape) -> tuple[int, dict[str, int]]:
    """Total and per-module MACs from PyTorch's own FLOP counter (FLOPs / 2): a second mechanism."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    per_module = {}
    root = type(model).__name__ + "."
    for name, ops in counter.get_flop_counts().items():  # keys look like "VisionTransformer.blocks.0.attn.qkv"
        per_module[name.removeprefix(root)] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


def _loaded(name):
    torch.manual_seed(0)
    return load_model(ModelSpec(f"timm:{name}", weights="random"))


def _check_pruned_model(result, pattern: NM):
    model = result.model
    for record in result.layers:
        weight = model.get_submodule(record["name"]).weight.detach()
        if record["pattern"]:
            assert record["pattern"] == str(pattern)
            assert is_nm_compliant(weight, pattern), record["name"]
            # exact density along the reduction axis (no group with fewer than n left unmarked)
            view = reduction_view(result.masks[record["param"]])
            per_group = view.reshape(view.shape[0], -1, pattern.m).sum(-1)
            assert bool((per_group == pattern.n).all()), record["name"]
        else:
            assert record["skipped"], record["name"]


@pytest.mark.parametrize(
    "name",
    [
        "vit_tiny_patch16_224",
        "resnet18",
        "convnextv2_atto",
        # The acceptance models: same code paths, minutes on 2 cores -> `make test-slow`.
        pytest.param("vit_base_patch16_224", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("convnextv2_base", marks=pytest.mark.slow),
    ],
)
def test_24_prune_is_exact_and_macs_match_independent_count(name):
    loaded = _loaded(name)
    total, per_module = _independent_macs(loaded.module, loaded.input_shape)
    result = prune_model(loaded, PruneConfig(budget="uniform"))
    _check_pruned_model(result, NM(2, 4))

    totals = result.totals
    # FlopCounterMode counts Linear (addmm) and Conv; it does not count CPU scaled_dot_product_attention,
    # so the attention products come from the architecture: 2 * N^2 * C per block (q@k^T and attn@v).
    attention = 0
    if hasattr(loaded.module, "blocks"):
        tokens = loaded.module.patch_embed.num_patches + loaded.module.num_prefix_tokens
        attention = len(loaded.module.blocks) * 2 * tokens**2 * loaded.module.embed_dim
    assert totals["attention_macs"] == attention
    assert totals["dense_macs"] == total + attention
    total += attention
    pruned = [r for r in result.layers if r["pattern"]]
    assert pruned, "no layer was pruned"
    for record in result.layers:
        # The FLOP counter attributes each Linear/Conv to its module path (timm Attention's qkv,
        # ConvNeXt's fc1 as 1x1, ...): compare layer by layer.
        assert record["macs"] == per_module[record["name"]], record["name"]
    kept = total - sum(per_module[r["name"]] for r in pruned) // 2
    assert totals["macs_kept"] == kept
    assert totals["mac_reduction"] == pytest.approx(1 - kept / total, abs=1e-12)

    skipped = {r["name"]: r["skipped"] for r in result.layers if not r["pattern"]}
    head = loaded.module.get_classifier()
    head_name = next(n for n, m in loaded.module.named_modules() if m is head)
    assert "classifier head" in skipped[head_name]
    stem = next(r for r in result.layers if r["kind"] == "conv")
    assert stem["weight_shape"][1] == 3 and "shorter than M=4" in stem["skipped"]
    if name.startswith("convnext"):
        assert any("depthwise" in reason for reason in skipped.values())


def test_reload_equals_in_memory_and_masks_are_buffers_of_record(tmp_path):
    loaded = _loaded("vit_tiny_patch16_224")
    out = prune(loaded, PruneConfig(budget="mp"), tmp_path / "pruned")
    x = torch.randn(2, *loaded.input_shape)
    artifact = load_pruned(out)
    with torch.no_grad():
        assert torch.equal(artifact.model(x), loaded.module(x))
    manifest = json.loads((out / "manifest.json").read_text())
    pruned = {r["param"] for r in manifest["layers"] if r["pattern"]}
    assert pruned == set(artifact.masks)
    params = dict(artifact.model.named_parameters())
    for name, mask in artifact.masks.items():
        assert bool((params[name].detach()[~mask] == 0).all())
    dense = load_pruned(out, which="dense").model
    assert not torch.equal(dense(x), artifact.model(x))  # the dense twin really is dense


def test_mp_budget_meets_its_target_and_prefers_bulk_like_layers():
    # Two equal-size layers: one pure noise, one with a strong planted low-rank signal. With a target
    # that allows pruning only one of them, the MP budget must pick the noise (bulk-like) one.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        net[0].weight.normal_(0, 0.05)
        u, v = torch.randn(256, 4), torch.randn(4, 256)
        net[2].weight.copy_(0.05 * torch.randn(256, 256) + 0.2 * (u @ v) / 16)
    loaded = LoadedModel(net, input_shape=(256,), name="toy", source={"kind": "custom"})
    total_linear = 2 * 256 * 256 + 256 * 10
    target = 0.5 * 256 * 256 / total_linear * 0.99  # exactly one layer's worth of 2:4 savings
    result = prune_model(loaded, PruneConfig(budget="mp", target_mac_reduction=target))
    by_name = {r["name"]: r for r in result.layers}
    assert by_name["0"]["pattern"] == "2:4"  # noise layer pruned
    assert by_name["2"]["pattern"] is None and "budget" in by_name["2"]["skipped"]
    assert by_name["0"]["signal"] > by_name["2"]["signal"]  # bulk fraction: noise is all bulk
    assert result.totals["mac_reduction"] >= target - 1e-9


class _QuietBranch(nn.Module):
    """`a` reaches the logits only through a 1e-3 residual branch, `b` directly: in weight space 2:4
    removes about the same share of each, on the outputs pruning `a` costs far less."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.relu(self.b(x + 1e-3 * self.a(x))))


def test_sensitivity_budget_prunes_the_layer_the_outputs_barely_feel():
    torch.manual_seed(0)
    loaded = LoadedModel(_QuietBranch().eval(), input_shape=(1, 8, 8), name="quiet", source={"kind": "custom"})
    target = 0.5 * 64 * 64 / (2 * 64 * 64 + 64 * 10) * 0.99  # one layer's worth of 2:4 savings
    result = prune_model(loaded, PruneConfig(budget="sensitivity", calib="synthetic", calib_batches=2,
                                             target_mac_reduction=target))
    by_name = {r["name"]: r for r in result.layers}
    assert by_name["a"]["pattern"] == "2:4" and by_name["b"]["pattern"] is None
    # The recorded damage is the measured relative logit error: tiny for the quiet branch.
    assert by_name["a"]["damage"] < 1e-4


def test_mp_target_too_high_is_a_clear_error():
    loaded = _loaded("resnet18")
    with pytest.raises(MpdeployError, match="more than the eligible layers can give"):
        prune_model(loaded, PruneConfig(budget="mp", target_mac_reduction=0.9))


def test_interrupted_prune_leaves_nothing(tmp_path):
    loaded = _loaded("resnet18")

    def stop(stage, done, total):
        if stage == "mask" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(loaded, PruneConfig(budget="uniform"), tmp_path / "pruned", progress=stop)
    assert os.listdir(tmp_path) == []


def test_tampered_artifact_is_refused(tmp_path):
    loaded = _loaded("resnet18")
    out = prune(loaded, PruneConfig(budget="uniform"), tmp_path / "pruned")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(MpdeployError, match="does not match the hash"):
        load_pruned(out)


def test_wanda_with_digits_calibration_and_cli(tmp_path, capsys):
    from mpdeploy.cli import main

    out = tmp_path / "p"
    code = main(["prune", "timm:resnet18", "--weights", "random", "--input-shape", "3,32,32", "--calib", "digits",
                 "--saliency", "wanda",
                 "--calib-batches", "2", "--budget", "uniform", "--pattern", "4:8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["saliency"] == "wanda"
    assert manifest["calibration"]["kind"] == "digits"
    artifact = load_pruned(out)
    for record in manifest["layers"]:
        if record["pattern"]:
            assert record["pattern"] == "4:8" and not record["runs_sparse"]
            assert is_nm_compliant(artifact.model.get_submodule(record["name"]).weight, NM(4, 8))
    assert manifest["totals"]["sparse_execution_mac_reduction"] == 0  # 4:8 is audit-only


def test_synthetic_calibration_is_flagged():
    loaded = _loaded("resnet18")
    loaded.input_shape = (3, 32, 32)
    result = prune_model(loaded, PruneConfig(budget="uniform", saliency="wanda", calib="synthetic", calib_batches=1))
    assert "synthetic" in result.extra["calibration"]["warning"]


def test_tome_mac_accounting_matches_token_counts():
    from mpdeploy.sparsity.tome import tome_macs

    loaded = _loaded("vit_tiny_patch16_224")
    expected_dense = tome_macs(loaded.module, 0, (1, *loaded.input_shape))
    expected_tome = tome_macs(loaded.module, 8, (1, *loaded.input_shape))
    result = prune_model(loaded, PruneConfig(budget="uniform", tome=8))
    totals = result.totals
    # Our count comes from forward hooks on real tensors; ToMe's from its token-count formulas.
    # We do not count ToMe's own matching/merge products, so leave those out of its total.
    assert totals["dense_macs"] == expected_dense["total"]
    assert totals["macs_after_tome"] == expected_tome["total"] - expected_tome["tome_merge"]
    assert totals["attention_macs"] == expected_tome["attention_matmul"]
    assert result.extra["tome"]["r"] == [8] * 12
    _check_pruned_model(result, NM(2, 4))
    assert totals["sparse_execution_mac_reduction"] > totals["mac_reduction"] - 1e-12

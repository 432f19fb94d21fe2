"""Channel permutations (mpdeploy.sparsity.permute): the search, and folds that leave the model's function unchanged."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from mpdeploy.sparsity.permute import search as permute_search  # noqa: E402
from mpdeploy.core.errors import MpdeployError  # noqa: E402
from mpdeploy.sparsity.layers import find_layers, skip_reason  # noqa: E402
from mpdeploy.sparsity.patterns import NM, is_nm_compliant  # noqa: E402
from mpdeploy.sparsity.permute.fold import find_folds, permute_model
from mpdeploy.sparsity.permute.search import kept_saliency, search_permutation, unstructured_kept

REPORT_KEYS = {
    "permuted", "reason", "kept_before", "kept_after", "unstructured_kept", "gap_recovered", "seconds", "group",
}


@pytest.fixture
def quick_search(monkeypatch):
    """Less search work: these tests check folding, not search quality, on 2 shared cores."""
    monkeypatch.setattr(permute_search, "DEFAULT_WORK", 4e6)
    monkeypatch.setattr(permute_search, "DEFAULT_ESCAPES", 1)


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------


def planted(rows: int, k: int, pattern: NM, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A saliency matrix that is exactly N:M under a hidden column order (scrambled here): the
    optimal permutation keeps everything, so the whole gap is recoverable."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(rows, k // pattern.m, pattern.m, generator=g) + 1.0
    keep = torch.rand(rows, k // pattern.m, pattern.m, generator=g).argsort(-1) < pattern.n
    base = (vals * keep).reshape(rows, k)
    return base[:, torch.randperm(k, generator=g)], float(base.sum())


def test_sorting_network_sorts():
    for m in range(2, 17):
        x = torch.randn(3, 5, m)
        got = torch.stack(permute_search._sorted_desc(list(x.unbind(-1))), -1)
        assert torch.equal(got, x.sort(-1, descending=True).values), m


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(4, 8), NM(8, 16)])
@pytest.mark.parametrize("shape", [(16, 64), (64, 512)])  # all-pairs mode, matching-round mode
def test_search_is_a_permutation_and_never_worse(pattern, shape):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(*shape, generator=g).abs()
    perm, before, after = search_permutation(s, pattern, seconds=None if shape[0] == 16 else 0.3)
    assert sorted(perm.tolist()) == list(range(shape[1]))
    assert after >= before
    assert before == pytest.approx(kept_saliency(s, pattern), rel=1e-9)
    assert after == pytest.approx(kept_saliency(s, pattern, perm), rel=1e-9)
    assert after <= unstructured_kept(s, pattern.density) + 1e-6


def test_search_is_deterministic_without_time_budget():
    s = torch.rand(32, 128, generator=torch.Generator().manual_seed(3))
    a = search_permutation(s, NM(2, 4), seed=5)
    b = search_permutation(s, NM(2, 4), seed=5)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]


def test_search_recovers_planted_structure():
    s, best = planted(64, 128, NM(2, 4))
    perm, before, after = search_permutation(s, NM(2, 4))
    assert before < 0.9 * best
    assert (after - before) / (best - before) > 0.99
    assert is_nm_compliant(s[:, perm], NM(2, 4))  # the hidden order (up to group relabelling) found


def test_search_recovers_gap_on_random_matrices():
    # The goal: >= 35% of the gap to unstructured on 64x128 |N(0,1)| (NVIDIA ASP's test size).
    s = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).abs()
    _, before, after = search_permutation(s, NM(2, 4))
    assert (after - before) / (unstructured_kept(s, 0.5) - before) >= 0.35


def test_search_edge_cases():
    identity = torch.arange(8)
    perm, before, after = search_permutation(torch.zeros(4, 8), NM(2, 4))
    assert torch.equal(perm, identity) and before == after == 0
    perm, _, _ = search_permutation(torch.rand(4, 4), NM(2, 4))  # one group: nothing to permute
    assert torch.equal(perm, torch.arange(4))
    with pytest.raises(MpdeployError):
        search_permutation(torch.rand(4, 6), NM(2, 4))


# ---------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------

MODELS = {
    # name: (timm kwargs, input); small inputs keep this fast, ViT needs img_size at creation
    "vit_tiny_patch16_224": ({"img_size": 64}, (2, 3, 64, 64)),
    "resnet18": ({}, (2, 3, 64, 64)),
    "convnext_atto": ({}, (2, 3, 64, 64)),
    "convnextv2_atto": ({}, (2, 3, 64, 64)),  # GRN between fc1 and fc2
}


def make(name: str) -> nn.Module:
    kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    # Random init leaves BN stats at 0/1 and GRN at 0: randomize them so a fold that forgot to move
    # them changes the output.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif type(m).__name__ == "GlobalResponseNorm" or isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_folding_leaves_outputs_unchanged(name, quick_search):
    model = make(name)
    x = torch.randn(*MODELS[name][1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(x)
    eligible = [layer for layer in find_layers(model) if skip_reason(layer, NM(2, 4)) is None]
    weights0 = {layer.name: model.get_submodule(layer.name).weight.detach().clone() for layer in eligible}
    report = permute_model(model, eligible, pattern=NM(2, 4), saliency="magnitude", stats={}, seconds_per_layer=None)
    with torch.no_grad():
        y1 = model(x)
    assert (y1 - y0).abs().max() < 1e-4

    assert set(report) == {layer.name for layer in eligible}
    for entry in report.values():
        assert REPORT_KEYS <= set(entry)
        assert entry["kept_after"] >= entry["kept_before"] - 1e-9
        assert entry["permuted"] or entry["reason"]
    permuted = [n for n, e in report.items() if e["permuted"]]
    assert permuted, "no layer was permuted: the exactness check proves nothing"
    # a permuted layer really has a non-identity column order now
    moved = [n for n in permuted if not torch.equal(model.get_submodule(n).weight, weights0[n])]
    assert moved == permuted

    # the permutation lives in the weights: it survives a state_dict round trip into a fresh model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = make(name)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    with torch.no_grad():
        assert (fresh.eval()(x) - y0).abs().max() < 1e-4


def test_vit_folds_and_reasons():
    model = make("vit_tiny_patch16_224")
    folds, reasons = find_folds(model)
    assert folds["blocks.0.mlp.fc2"].producers[0].module == "blocks.0.mlp.fc1"
    attn = folds["blocks.0.attn.proj"]
    assert attn.block == model.blocks[0].attn.head_dim
    assert attn.producers[0].offsets == (2 * 192,)  # v rows of qkv only
    assert "LayerNorm" in reasons["blocks.0.attn.qkv"] and "LayerNorm" in reasons["blocks.0.mlp.fc1"]
    assert "blocks.0.attn.qkv" not in folds and "blocks.0.mlp.fc1" not in folds


def test_attention_permutation_stays_within_heads(quick_search):
    model = make("vit_tiny_patch16_224")
    attn = model.blocks[0].attn
    qkv0 = attn.qkv.weight.detach().clone()
    layer = next(layer for layer in find_layers(model) if layer.name == "blocks.0.attn.proj")
    report = permute_model(model, [layer], pattern=NM(2, 4), saliency="magnitude", stats={}, seconds_per_layer=None)
    assert report["blocks.0.attn.proj"]["permuted"]
    dim, hd = 192, attn.head_dim
    qkv1 = attn.qkv.weight.detach()
    assert torch.equal(qkv1[: 2 * dim], qkv0[: 2 * dim])  # q and k rows untouched
    v0, v1 = qkv0[2 * dim :], qkv1[2 * dim :]
    for h in range(attn.num_heads):  # each head's v rows are a permutation of the same head's rows
        rows0 = {tuple(r.tolist()) for r in v0[h * hd : (h + 1) * hd]}
        rows1 = {tuple(r.tolist()) for r in v1[h * hd : (h + 1) * hd]}
        assert rows0 == rows1


def test_resnet_reasons():
    model = make("resnet18")
    folds, reasons = find_folds(model)
    assert set(folds) == {f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)}
    assert "residual" in reasons["layer1.0.conv1"] and "residual" in reasons["layer2.0.downsample.0"]
    edits = {(e.module, e.attr) for e in folds["layer1.0.conv2"].producers}
    assert {("layer1.0.conv1", "weight"), ("layer1.0.bn1", "running_mean"), ("layer1.0.bn1", "running_var")} <= edits


def test_unknown_module_between_producer_and_consumer_is_refused():
    model = make("convnext_atto")
    model.stages[0].blocks[0].mlp.act = nn.PReLU(160)  # per-channel parameters: would have to move too
    folds, reasons = find_folds(model)
    assert "stages.0.blocks.0.mlp.fc2" not in folds
    assert "act" in reasons["stages.0.blocks.0.mlp.fc2"]
    assert "stages.0.blocks.1.mlp.fc2" in folds


def test_prune_model_with_permute_end_to_end(quick_search):
    from mpdeploy.models.spec import LoadedModel
    from mpdeploy.prune.stage import PruneConfig, prune_model

    kwargs = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 2}
    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    loaded = LoadedModel(module, input_shape=(1, 32, 32), name="vit-tiny-digits",
                         source={"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": kwargs})
    result = prune_model(loaded, PruneConfig(permute=True, calib="digits", saliency="wanda", calib_batches=2))
    records = {r["name"]: r for r in result.layers}
    assert any((r["permutation"] or {}).get("permuted") for r in records.values())
    for r in records.values():
        if r["pattern"]:
            weight = result.model.get_submodule(r["name"]).weight
            assert is_nm_compliant(weight, NM(2, 4))
            assert not bool((weight.detach()[~result.masks[r["param"]]] != 0).any())

"""Token merging (mpdeploy.sparsity.tome): exactness at r=0, merge correctness, token counts, ONNX export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from mpdeploy.core.errors import MpdeployError  # noqa: E402
from mpdeploy.sparsity.tome import (  # noqa: E402
    apply_tome,
    bipartite_merge,
    remove_tome,
    tome_mac_ratio,
    tome_macs,
    tome_token_counts,
)

# name, timm kwargs, prefix tokens
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", {}, 1),
    "deit": ("deit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "vit_avg_no_cls": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
}


# The real architectures, made smaller to keep the file fast on 2 shared cores: 128x128 input
# (64 patches) and 6 blocks unless a test says otherwise.
IMG, DEPTH = 128, 6


def make(key: str, seed: int = 0, **extra) -> nn.Module:
    name, kwargs, _ = CONFIGS[key]
    torch.manual_seed(seed)
    extra = {"img_size": IMG, "depth": DEPTH, **extra}
    return timm.create_model(name, pretrained=False, **{**kwargs, **extra}).eval()


def image(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_r0_reproduces_unpatched(key):
    model = make(key)
    x = image()
    with torch.no_grad():
        ref = model(x)
        out = apply_tome(model, 0)(x)
    assert (out - ref).abs().max().item() < 1e-5
    assert model._tome_r == [0] * len(model.blocks)


@pytest.mark.parametrize("key,r,full", [
    ("vit", 8, True), ("deit", 4, False), ("deit_distilled", 4, False), ("vit_avg_no_cls", 4, False),
])
def test_r_changes_output_and_merges_r_tokens_per_block(key, r, full):
    # full: the real 224x224, 12-block model with r=8 (197 -> 101 tokens)
    model = make(key, img_size=224, depth=12) if full else make(key)
    x = image(size=224) if full else image()
    with torch.no_grad():
        ref = model(x)
    apply_tome(model, r)
    # qkv sees the tokens entering a block, fc1 the tokens left after that block's merge
    seen_in, seen_out = [], []
    hooks = []
    for blk in model.blocks:
        hooks.append(blk.attn.qkv.register_forward_hook(lambda m, a, o: seen_in.append(a[0].shape[1])))
        hooks.append(blk.mlp.fc1.register_forward_hook(lambda m, a, o: seen_out.append(a[0].shape[1])))
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    n0 = (196 if full else 64) + CONFIGS[key][2]
    expected = [n0 - r * i for i in range(len(model.blocks) + 1)]
    assert seen_in == expected[:-1] and seen_out == expected[1:]
    assert tome_token_counts(model) == expected
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() > 1e-3


def test_token_counts_and_clamping():
    assert tome_token_counts(197, 8, 12) == [197 - 8 * i for i in range(13)]
    assert tome_token_counts(197, [0, 5] * 6, 12)[:4] == [197, 197, 192, 192]
    # 16 patches: a block merges at most half of its patch tokens and always leaves one
    assert tome_token_counts(17, 8, 4, num_prefix_tokens=1) == [17, 9, 5, 3, 2]
    assert tome_token_counts(18, 100, 3, num_prefix_tokens=2) == [18, 10, 6, 4]
    assert tome_token_counts(16, 100, 6, num_prefix_tokens=0) == [16, 8, 4, 2, 1, 1, 1]
    model = make("vit", img_size=64, depth=4)
    apply_tome(model, 100)  # clamped, not an error
    with torch.no_grad():
        out = model(image(size=64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert tome_token_counts(model) == [17, 9, 5, 3, 2]


def test_invalid_r_and_models_raise_user_errors():
    model = make("vit", depth=2)
    with pytest.raises(MpdeployError, match="negative"):
        apply_tome(model, -1)
    with pytest.raises(MpdeployError, match="negative"):
        apply_tome(model, [2, -3])
    with pytest.raises(MpdeployError, match="2 blocks"):
        apply_tome(model, [1, 2, 3])
    with pytest.raises(MpdeployError, match="not an int"):
        apply_tome(model, [1, 2.5])
    with pytest.raises(MpdeployError, match="VisionTransformer"):
        apply_tome(nn.Sequential(nn.Linear(4, 4)), 2)
    assert not hasattr(model, "_tome_r")  # a failed call leaves the model untouched


def test_merge_known_case_by_hand():
    """1 prefix + 6 patch tokens, A = patches 0,2,4 and B = 1,3,5; expected result written out."""
    e = torch.eye(3)
    C = 5
    x = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(0))
    size = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0]).view(1, 7, 1).repeat(2, 1, 1)
    pA = [e[1], e[0] + 0.5 * e[2], e[2] + 0.9 * e[1]]  # patches 0, 2, 4
    # batch 0: B = (e0, e1, e2) -> best partners 0->3 (cos 1), 2->1 (0.894), 4->5 (0.743)
    # batch 1: B = (e2, e0, e1) -> 0->5 (cos 1), 2->3 (0.894), 4->1 (0.743)
    # the prefix key equals patch 3's / patch 5's key: it must never be merged anyway
    metric = torch.stack([
        torch.stack([e[1], pA[0], e[0], pA[1], e[1], pA[2], e[2]]),
        torch.stack([e[1], pA[0], e[2], pA[1], e[0], pA[2], e[1]]),
    ])
    out, new_size = bipartite_merge(x, metric, size, r=2, num_prefix_tokens=1)
    t = lambda b, i: x[b, 1 + i]  # noqa: E731  patch token i of batch b
    s = size[0, 1:, 0]
    exp0 = [x[0, 0], t(0, 4),
            (s[1] * t(0, 1) + s[2] * t(0, 2)) / (s[1] + s[2]),
            (s[3] * t(0, 3) + s[0] * t(0, 0)) / (s[3] + s[0]),
            t(0, 5)]
    exp1 = [x[1, 0], t(1, 4),
            t(1, 1),
            (s[3] * t(1, 3) + s[2] * t(1, 2)) / (s[3] + s[2]),
            (s[5] * t(1, 5) + s[0] * t(1, 0)) / (s[5] + s[0])]
    torch.testing.assert_close(out, torch.stack([torch.stack(exp0), torch.stack(exp1)]))
    assert new_size[..., 0].tolist() == [[1, 1, 2, 5, 1], [1, 1, 1, 4, 3]]


def _image_with_duplicate_patches(pairs, size=IMG, patch=16, seed=3):
    """Random image where patch b of each (a, b) pair is an exact copy of patch a."""
    img = image(batch=2, size=size, seed=seed)
    g = size // patch
    for a, b in pairs:
        ra, ca, rb, cb = a // g, a % g, b // g, b % g
        img[:, :, rb * patch:(rb + 1) * patch, cb * patch:(cb + 1) * patch] = \
            img[:, :, ra * patch:(ra + 1) * patch, ca * patch:(ca + 1) * patch]
    return img


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "vit_avg_no_cls"])
def test_merging_exact_duplicates_is_lossless(key):
    """Two identical tokens attend and are attended exactly like one token of size 2, so merging
    them (and only them) with proportional attention and size-weighted pooling must reproduce the
    unmerged model. Without log(size) in the logits it must not (the check can fail)."""
    model = make(key)
    with torch.no_grad():
        model.pos_embed.zero_()  # no positional signal: duplicated patches give identical tokens
    pairs = [(0, 7), (20, 51), (10, 33), (40, 63)]  # (even = set A, odd = set B) patch indices
    x = _image_with_duplicate_patches(pairs)
    r = [len(pairs)] + [0] * (len(model.blocks) - 1)
    with torch.no_grad():
        ref = model(x)
        out = apply_tome(model, r)(x)
        out_no_prop = apply_tome(model, r, prop_attn=False)(x)
    assert tome_token_counts(model)[1] == tome_token_counts(model)[0] - len(pairs)
    assert (out - ref).abs().max().item() < 1e-4
    assert (out_no_prop - ref).abs().max().item() > 1e-3


def test_reapply_after_reload_and_pickle():
    model = apply_tome(make("deit", depth=3), [4, 2, 1])
    x = image(batch=1)
    with torch.no_grad():
        out = model(x)
    fresh = make("deit", seed=5, depth=3)
    fresh.load_state_dict(model.state_dict())  # ToMe adds no parameters and renames none
    with torch.no_grad():
        torch.testing.assert_close(apply_tome(fresh, model._tome_r)(x), out)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)
    remove_tome(model)
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "_tome_r")


def test_mac_ratio_matches_linear_hooks():
    model = make("vit")
    assert tome_mac_ratio(model, 0, (1, 3, IMG, IMG)) == 1.0
    apply_tome(model, 4)
    linear_macs = []
    hooks = [m.register_forward_hook(lambda m, a, o: linear_macs.append(a[0][0].numel() * m.out_features))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(image(batch=1))
    for h in hooks:
        h.remove()
    macs = tome_macs(model, 4, (1, 3, IMG, IMG))
    assert macs["block_linear"] + macs["head"] == sum(linear_macs)
    counts = macs["token_counts"]
    assert macs["attention_matmul"] == sum(2 * n * n * 192 for n in counts[:-1])
    assert counts == [65, 61, 57, 53, 49, 45, 41]
    ratio = tome_mac_ratio(model, 4, (1, 3, IMG, IMG))
    assert 0.6 < ratio < 0.9 and ratio > tome_mac_ratio(model, 6, (1, 3, IMG, IMG))
    # ViT-B/16 at 224, for the benchmark: the ratio only depends on shapes
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1)
    assert tome_macs(vit_b, 0, (1, 3, 224, 224))["attention_matmul"] == 2 * 197 * 197 * 768


# --- ONNX --------------------------------------------------------------------------------------

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BANNED_OPS = {"ScatterElements", "ScatterND", "Scatter", "NonZero", "Unique", "Loop", "If"}


def _export(model, x, path, dynamo):
    kwargs = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    if dynamo:
        # dynamic_shapes, not dynamic_axes: the dynamo exporter deprecates the latter
        del kwargs["dynamic_axes"]
        batch = torch.export.Dim("batch", min=1)
        kwargs.update(dynamo=True, external_data=False, verbose=False, dynamic_shapes=({0: batch},))
    else:
        kwargs.update(dynamo=False)
    torch.onnx.export(model, (x,), str(path), **kwargs)


@pytest.mark.parametrize("key,dynamo", [
    ("vit", False), ("vit", True), ("deit_distilled", False), ("vit_avg_no_cls", False),
])
def test_onnx_export_matches_torch(key, dynamo, tmp_path):
    # 96x96 input (36 patches) and 4 blocks keep the export fast; r=4 -> 37, 33, 29, 25, 21 tokens
    model = apply_tome(make(key, img_size=96, depth=4), 4)
    x2, x1 = image(batch=2, size=96), image(batch=1, size=96, seed=7)
    with torch.no_grad():
        ref2, ref1 = model(x2).numpy(), model(x1).numpy()
    path = tmp_path / "tome.onnx"
    _export(model, x2, path, dynamo)

    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & BANNED_OPS, f"ops TensorRT may lack or that scatter: {ops & BANNED_OPS}"
    assert {"TopK", "GatherElements", "Log"} <= ops  # the merge really is in the graph
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out2 = sess.run(None, {"x": x2.numpy()})[0]
    out1 = sess.run(None, {"x": x1.numpy()})[0]
    assert out2.shape == ref2.shape and out1.shape == ref1.shape
    assert np.abs(out2 - ref2).max() < 1e-4
    assert np.abs(out1 - ref1).max() < 1e-4

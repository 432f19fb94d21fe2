"""Folding permutations into producer layers, so they cost nothing at run time and survive save/load."""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from mpdeploy.sparsity.layers import LayerInfo
from mpdeploy.sparsity.patterns import NM
from mpdeploy.sparsity.threads import single_thread

from mpdeploy.sparsity.permute.search import SINGLE_THREAD_ELEMENTS, UNSTRUCTURED_KIND, kept_saliency, search_permutation, unstructured_kept

logger = logging.getLogger(__name__)
# ----------------------------------------------------------------------------------------------
# folding: which layers' input channels can be permuted for free, and how
# ----------------------------------------------------------------------------------------------

LN_STREAM_REASON = "fed by LayerNorm of the residual stream: needs a whole-stream permutation (not done)"
DW_STREAM_REASON = (
    "fed by the residual stream through a depthwise conv and LayerNorm: needs a whole-stream permutation (not done)"
)
RESIDUAL_REASON = (
    "input is the residual stream (block input, shared with the shortcut add): needs one shared permutation "
    "across the whole residual group (not done)"
)
NO_FOLD_REASON = (
    "no producer to fold a permutation into (not a recognized block structure); a runtime gather would cost "
    "time at inference (not done)"
)


@dataclass(frozen=True)
class ChannelEdit:
    """A tensor whose channels along `dim` follow the consumer's input channels. The K channels
    sit at `offsets` along `dim` (one offset usually; two for gated MLPs, the v slice for qkv)."""

    module: str
    attr: str  # parameter or buffer name
    dim: int
    offsets: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Fold:
    """How to permute the input channels of `consumer` without changing the model's function."""

    consumer: str
    group: str  # name of the coupled group, for the report
    producers: tuple[ChannelEdit, ...]
    block: int | None = None  # permutations only within consecutive blocks of this size (attention heads)


def _is_param_free(module: nn.Module) -> bool:
    return next(module.parameters(recurse=True), None) is None


def _per_channel_edits(path: str, module: nn.Module, channels: int) -> tuple[ChannelEdit, ...] | None:
    """Edits for an elementwise / per-channel module sitting between producer and consumer, or
    None if we cannot prove it commutes with a channel permutation."""
    if isinstance(module, (nn.Identity, nn.Dropout)) or type(module).__name__ in ("DropBlock2d", "DropPath"):
        return ()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm)):
        if module.num_features != channels:
            return None
        names = [a for a in ("weight", "bias", "running_mean", "running_var") if getattr(module, a, None) is not None]
        act = getattr(module, "act", None)  # timm BatchNormAct2d: BN + activation (+ drop) in one
        if act is not None and not _is_param_free(act):
            return None
        return tuple(ChannelEdit(path, a, 0) for a in names)
    if isinstance(module, nn.LayerNorm):  # also timm LayerNorm / LayerNorm2d: statistics are permutation-invariant
        if tuple(module.normalized_shape) != (channels,):
            return None
        return tuple(ChannelEdit(path, a, 0) for a in ("weight", "bias") if getattr(module, a, None) is not None)
    if type(module).__name__ == "GlobalResponseNorm":
        # GRN: per-channel spatial L2 norm divided by its mean over channels (permutation-invariant),
        # then per-channel weight/bias: the weight and bias move with the channels.
        if module.weight.shape != (channels,):
            return None
        return (ChannelEdit(path, "weight", 0), ChannelEdit(path, "bias", 0))
    if type(module).__name__ == "BlurPool2d":
        filt = getattr(module, "filt", None)
        if filt is not None and filt.shape[0] == channels:
            return (ChannelEdit(path, "filt", 0),)
        return ()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return ()
    # Activations: elementwise and parameter-free (a per-channel PReLU would have to move too).
    origin = type(module).__module__
    if _is_param_free(module) and origin.startswith(("torch.nn.modules.activation", "timm.layers.activations")):
        return ()
    return None


def _layer_edits(path: str, layer: nn.Module) -> tuple[ChannelEdit, ...]:
    """The producer's own output channels: weight rows (+ bias)."""
    edits = [ChannelEdit(path, "weight", 0)]
    if getattr(layer, "bias", None) is not None:
        edits.append(ChannelEdit(path, "bias", 0))
    return tuple(edits)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mlp_fold(path: str, mlp: nn.Module) -> tuple[Fold | None, str | None]:
    """timm Mlp / GlobalResponseNormMlp / GluMlp / SwiGLU: fc1 rows (+bias, + norm/GRN) <-> fc2 columns."""
    fc2 = mlp.fc2
    kinds = (nn.Linear,) if isinstance(fc2, nn.Linear) else (nn.Conv2d,)
    if isinstance(fc2, nn.Conv2d) and (fc2.kernel_size != (1, 1) or fc2.groups != 1):
        return None, "fc2 is not a plain 1x1 conv"
    hidden = fc2.weight.shape[1]
    name = type(mlp).__name__
    edits: list[ChannelEdit] = []
    between = []
    if name == "SwiGLU":
        for fc in ("fc1_g", "fc1_x"):
            layer = getattr(mlp, fc)
            if not isinstance(layer, kinds) or layer.weight.shape[0] != hidden:
                return None, f"{fc} does not produce fc2's {hidden} input channels"
            edits += _layer_edits(_join(path, fc), layer)
        between = ["act", "drop", "norm"]
    else:
        fc1 = mlp.fc1
        if not isinstance(fc1, kinds) or (isinstance(fc1, nn.Conv2d) and fc1.groups != 1):
            return None, "fc1 and fc2 are not the same kind of plain layer"
        if name == "GluMlp":
            if fc1.weight.shape[0] != 2 * hidden:
                return None, "gated fc1 does not produce 2x fc2's input channels"
            # x1, x2 = fc1(x).chunk(2): both halves must move together.
            edits.append(ChannelEdit(_join(path, "fc1"), "weight", 0, (0, hidden)))
            if fc1.bias is not None:
                edits.append(ChannelEdit(_join(path, "fc1"), "bias", 0, (0, hidden)))
        else:
            if fc1.weight.shape[0] != hidden:
                return None, "fc1 does not produce fc2's input channels"
            edits += _layer_edits(_join(path, "fc1"), fc1)
        between = ["act", "drop1", "norm", "grn"]
    for attr in between:
        sub = getattr(mlp, attr, None)
        if sub is None:
            continue
        sub_edits = _per_channel_edits(_join(path, attr), sub, hidden)
        if sub_edits is None:
            return None, f"{attr} ({type(sub).__name__}) between fc1 and fc2 may not commute with a channel permutation"
        edits += sub_edits
    return Fold(_join(path, "fc2"), f"{path} (fc1 -> fc2)", tuple(edits)), None


def _attention_fold(path: str, attn: nn.Module) -> tuple[Fold | None, str | None]:
    """timm Attention: v rows of qkv (per head) <-> proj columns. q/k rows stay: each head's output
    is attn_h @ v_h, so permuting v_h's channels permutes that head's output channels, nothing else.
    Whole-head moves never change which weights share an N:M group (M divides head_dim), so the
    search runs within each head."""
    qkv, proj = attn.qkv, attn.proj
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    dim = heads * head_dim
    linear = isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
    if not linear or qkv.out_features != 3 * dim or proj.in_features != dim:
        return None, "qkv / proj shapes do not match the head layout"
    edits = [ChannelEdit(_join(path, "qkv"), "weight", 0, (2 * dim,))]
    if qkv.bias is not None:
        edits.append(ChannelEdit(_join(path, "qkv"), "bias", 0, (2 * dim,)))
    for attr in ("q_bias", "v_bias"):  # separate q/v biases (other attention classes): not this layout
        if getattr(attn, attr, None) is not None:
            return None, f"attention has a separate {attr}"
    norm = getattr(attn, "norm", None)  # scale_norm: LayerNorm over the concatenated heads
    if norm is not None:
        norm_edits = _per_channel_edits(_join(path, "norm"), norm, dim)
        if norm_edits is None:
            return None, f"attention output norm ({type(norm).__name__}) is not per-channel"
        edits += norm_edits
    gate = getattr(attn, "gate", None)  # gated attention: gate rows multiply the head outputs
    if gate is not None:
        if not isinstance(gate, nn.Linear) or gate.out_features != dim:
            return None, "attention gate does not match the head layout"
        edits += _layer_edits(_join(path, "gate"), gate)
    return Fold(_join(path, "proj"), f"{path} (v heads -> proj)", tuple(edits), block=head_dim), None


def _resnet_folds(path: str, block: nn.Module) -> tuple[list[Fold], dict[str, str]]:
    """timm BasicBlock / Bottleneck: conv_k input <-> conv_{k-1} out channels (+ BN, + bias) inside
    the block; everything between them must be per-channel."""
    bottleneck = type(block).__name__ == "Bottleneck"
    chain = (
        [("conv1", ["bn1", "act1"], "conv2"), ("conv2", ["bn2", "drop_block", "act2", "aa"], "conv3")]
        if bottleneck
        else [("conv1", ["bn1", "drop_block", "act1", "aa"], "conv2")]
    )
    folds, reasons = [], {}
    for producer, between, consumer in chain:
        prod = getattr(block, producer)
        cons_path = _join(path, consumer)
        if not isinstance(prod, nn.Conv2d) or prod.groups != 1:
            reasons[cons_path] = f"producer {producer} is a grouped conv: its output channels cannot move freely"
            continue
        channels = prod.out_channels
        edits = list(_layer_edits(_join(path, producer), prod))
        ok = True
        for attr in between:
            sub = getattr(block, attr, None)
            if sub is None:
                continue
            sub_edits = _per_channel_edits(_join(path, attr), sub, channels)
            if sub_edits is None:
                reasons[cons_path] = (
                    f"{attr} ({type(sub).__name__}) between {producer} and {consumer} may not commute with a "
                    "channel permutation"
                )
                ok = False
                break
            edits += sub_edits
        if ok:
            folds.append(Fold(cons_path, f"{path} ({producer} -> {consumer})", tuple(edits)))
    reasons.setdefault(_join(path, "conv1"), RESIDUAL_REASON)
    return folds, reasons


def find_folds(model: nn.Module) -> tuple[dict[str, Fold], dict[str, str]]:
    """Producer->consumer couplings the model's structure supports, keyed by consumer name, and
    for layers known to have none, why (the rest get a generic reason)."""
    folds: dict[str, Fold] = {}
    reasons: dict[str, str] = {}
    for path, module in model.named_modules():
        kind = type(module).__name__
        # Only timm's own classes: the folds below rely on their forward code.
        if not type(module).__module__.startswith("timm."):
            kind = f"other:{kind}"
        if kind in ("Mlp", "GlobalResponseNormMlp", "GluMlp", "SwiGLU") and hasattr(module, "fc2"):
            fold, why = _mlp_fold(path, module)
            if fold:
                folds[fold.consumer] = fold
            else:
                reasons[_join(path, "fc2")] = why
        elif kind == "Attention" and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "head_dim")):
            fold, why = _attention_fold(path, module)
            if fold:
                folds[fold.consumer] = fold
            else:
                reasons[_join(path, "proj")] = why
            reasons[_join(path, "qkv")] = LN_STREAM_REASON
        elif kind in ("BasicBlock", "Bottleneck") and all(hasattr(module, a) for a in ("conv1", "bn1", "conv2")):
            block_folds, block_reasons = _resnet_folds(path, module)
            folds.update({f.consumer: f for f in block_folds})
            reasons.update(block_reasons)
        elif kind == "Block" and hasattr(module, "mlp") and hasattr(module, "norm2"):
            reasons[_join(path, "mlp.fc1")] = LN_STREAM_REASON
            reasons[_join(path, "mlp.fc1_g")] = LN_STREAM_REASON
            reasons[_join(path, "mlp.fc1_x")] = LN_STREAM_REASON
        elif kind == "ConvNeXtBlock":
            reasons[_join(path, "mlp.fc1")] = DW_STREAM_REASON
        if path.endswith("downsample") and isinstance(module, nn.Module):
            for name, sub in module.named_modules():
                if isinstance(sub, nn.Conv2d):
                    reasons.setdefault(_join(path, name), RESIDUAL_REASON)
    return folds, reasons


def _full_index(size: int, offsets: tuple[int, ...], perm: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(size, device=perm.device)
    for off in offsets:
        idx[off : off + perm.numel()] = perm + off
    return idx


def _edit_tensor(model: nn.Module, edit: ChannelEdit) -> torch.Tensor:
    return getattr(model.get_submodule(edit.module), edit.attr)


def apply_fold(model: nn.Module, fold: Fold, perm: torch.Tensor) -> None:
    """Reorder the consumer's input channels to `perm` (new j = old perm[j]) and the producers'
    matching output channels the same way, in place: the model's function does not change."""
    with torch.no_grad():
        consumer = model.get_submodule(fold.consumer).weight
        consumer.copy_(consumer.index_select(1, perm.to(consumer.device)))
        for edit in fold.producers:
            t = _edit_tensor(model, edit)
            p = perm.to(t.device)
            t.copy_(t.index_select(edit.dim, _full_index(t.shape[edit.dim], edit.offsets, p)))


def _shared_tensors(model: nn.Module) -> set[int]:
    """ids of tensors registered under more than one name (tied weights): never edit those."""
    seen: dict[int, int] = {}
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for _, t in named:
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _search_blocks(scores: torch.Tensor, pattern: NM, block: int | None, seconds: float | None, seed: int):
    """Search per consecutive block of columns (attention heads) or over all columns."""
    k = scores.shape[1]
    if not block or block >= k:
        return search_permutation(scores, pattern, seconds, seed)
    parts, before, after = [], 0.0, 0.0
    count = k // block
    for b in range(count):
        sub = scores[:, b * block : (b + 1) * block]
        perm, kb, ka = search_permutation(sub, pattern, None if seconds is None else seconds / count, seed + b)
        parts.append(perm + b * block)
        before, after = before + kb, after + ka
    return torch.cat(parts), before, after


def permute_model(
    model: nn.Module,
    eligible: list[LayerInfo],
    *,
    pattern: NM,
    saliency: str,
    stats: dict,
    seconds_per_layer: float | None,
    seed: int = 0,
) -> dict[str, dict]:
    """Search and fold input-channel permutations in place; the model's function is unchanged.

    Each consumer's permutation is searched on its own saliency (`wanda` with calibration stats when
    available, else magnitude; `block-cost` searches on wanda). Returns a JSON-able report per
    eligible layer; kept values are fractions of the layer's total saliency.
    """
    ctx = _Context(model, *find_folds(model), _shared_tensors(model), {}, pattern, saliency, stats or {},
                   seconds_per_layer, seed)
    report: dict[str, dict] = {}
    for layer in eligible:
        with single_thread(math.prod(layer.weight_shape) * pattern.m < SINGLE_THREAD_ELEMENTS):
            report[layer.name] = _permute_layer(ctx, layer)
    return report


@dataclass(frozen=True)
class _Context:
    model: nn.Module
    folds: dict[str, Fold]
    reasons: dict[str, str]
    shared: set[int]
    edited: dict[tuple[int, int], str]  # (tensor id, dim) -> group that already moved it (mutated)
    pattern: NM
    saliency: str
    stats: dict
    seconds: float | None
    seed: int


def _permute_layer(ctx: _Context, layer: LayerInfo) -> dict:
    from mpdeploy.sparsity.saliency import saliency_scores

    pattern = ctx.pattern
    layer_stats = ctx.stats.get(layer.name)
    if layer_stats is not None and layer_stats.col_sq_sum is None:  # no calibration input reached it
        layer_stats = None
    kind = "magnitude" if ctx.saliency == "magnitude" or layer_stats is None else "wanda"
    scores = saliency_scores(ctx.model.get_submodule(layer.name).weight, kind, layer_stats)
    total = float(scores.double().sum()) or 1.0
    before = kept_saliency(scores, pattern) / total
    entry = {
        "permuted": False,
        "reason": None,
        "kept_before": before,
        "kept_after": before,
        "unstructured_kept": unstructured_kept(scores, pattern.density) / total,
        "gap_recovered": 0.0,
        "seconds": 0.0,
        "group": None,
        "saliency": kind,
        "unstructured": UNSTRUCTURED_KIND,
    }
    fold = ctx.folds.get(layer.name)
    if fold is None:
        entry["reason"] = ctx.reasons.get(layer.name, NO_FOLD_REASON)
        if entry["reason"] in (LN_STREAM_REASON, DW_STREAM_REASON, RESIDUAL_REASON):
            entry["group"] = "residual stream"
        return entry
    entry["group"] = fold.group
    why = _fold_conflict(ctx.model, fold, ctx.shared, ctx.edited)
    if why is None and fold.block and fold.block % pattern.m:
        why = f"head_dim {fold.block} is not a multiple of M={pattern.m}: N:M groups would span heads (not done)"
    if why:
        entry["reason"] = why
        return entry
    start = time.perf_counter()
    perm, kb, ka = _search_blocks(scores, pattern, fold.block, ctx.seconds, ctx.seed)
    entry["seconds"] = time.perf_counter() - start
    if torch.equal(perm, torch.arange(perm.numel())):
        entry["reason"] = "the search found no order keeping more saliency than the current one"
        return entry
    apply_fold(ctx.model, fold, perm)
    for key in _fold_tensors(ctx.model, fold):
        ctx.edited[key] = fold.group
    entry.update(permuted=True, kept_before=kb / total, kept_after=ka / total)
    gap = entry["unstructured_kept"] - entry["kept_before"]
    entry["gap_recovered"] = (entry["kept_after"] - entry["kept_before"]) / gap if gap > 0 else 0.0
    logger.info("permuted %s: kept %.4f -> %.4f (%.0f%% of the gap to unstructured) in %.2fs",
                layer.name, entry["kept_before"], entry["kept_after"], 100 * entry["gap_recovered"], entry["seconds"])
    return entry


def _fold_tensors(model: nn.Module, fold: Fold) -> list[tuple[int, int]]:
    out = [(id(model.get_submodule(fold.consumer).weight), 1)]
    out += [(id(_edit_tensor(model, e)), e.dim) for e in fold.producers]
    return out


def _fold_conflict(model: nn.Module, fold: Fold, shared: set[int], edited: dict) -> str | None:
    """Why this fold must not be applied (tied weights, or channels another fold already moved)."""
    for t_id, dim in _fold_tensors(model, fold):
        if t_id in shared:
            return "a tensor of this group is shared with another module (tied weights): not permuted"
        if (t_id, dim) in edited:
            return f"these channels were already permuted by {edited[(t_id, dim)]}"
    return None

"""Token merging (ToMe) for timm Vision Transformers, with static shapes and export-friendly ops.

Written from the project's method notes (docs/method.md section 7); the reference implementation is
CC-BY-NC and is not used here. Between attention and MLP of every block, `r` patch tokens are
merged away by bipartite soft matching:

* prefix tokens (class, distillation, register tokens: `model.num_prefix_tokens`) are never merged;
* the remaining tokens are split alternately into A (even positions) and B (odd positions);
* each A token is matched to its most similar B token, similarity = cosine of the attention keys
  averaged over heads;
* the `r` best-matched A tokens are folded into their B partners as size-weighted averages;
* every token carries its size (how many patches it stands for) and attention adds log(size) to
  the logits (proportional attention), so a merged token is attended to as much as its parts were.

The merge is a one-hot assignment matrix and a batched matmul followed by a division by sizes; the
matching uses ReduceMax/ArgMax, TopK and GatherElements. No scatter, no data-dependent shapes: the
token count after every block is a Python int at trace time, and the batch axis stays dynamic.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

__all__ = [
    "apply_tome",
    "remove_tome",
    "tome_token_counts",
    "tome_mac_ratio",
    "tome_macs",
    "merge_r_for_tokens",
]


# --------------------------------------------------------------------------------------------
# schedule helpers (pure Python, shared by the forward pass and MAC accounting)
# --------------------------------------------------------------------------------------------


def merge_r_for_tokens(r: int, num_tokens: int, num_prefix_tokens: int) -> int:
    """How many tokens a block can really merge: at most |A|, and never when B would be empty.

    With T patch tokens, |A| = ceil(T/2) and |B| = floor(T/2); merging all of A still leaves the
    prefix tokens plus |B| >= 1 tokens.
    """
    t = num_tokens - num_prefix_tokens
    if t < 2:
        return 0
    return max(0, min(int(r), (t + 1) // 2))


def _normalize_r(r: int | Sequence[int], depth: int) -> list[int]:
    """Turn `r` (int or per-block sequence) into a validated list of `depth` non-negative ints."""
    if isinstance(r, bool):
        raise MpdeployError(f"ToMe r must be an int or a list of ints, got {r!r}; pass e.g. --tome 8")
    if isinstance(r, int):
        rs = [r] * depth
    else:
        try:
            rs = list(r)
        except TypeError:
            raise MpdeployError(
                f"ToMe r must be an int or a list of ints, got {type(r).__name__}; pass e.g. --tome 8"
            ) from None
        if len(rs) != depth:
            raise MpdeployError(
                f"ToMe r schedule has {len(rs)} entries but the model has {depth} blocks; "
                f"give one r per block or a single int"
            )
    out = []
    for i, v in enumerate(rs):
        if isinstance(v, bool) or not isinstance(v, int):
            # accept integral numpy/torch scalars, reject 2.5 and strings
            try:
                iv = int(v)
            except (TypeError, ValueError):
                iv = None
            if iv is None or iv != v or isinstance(v, bool):
                raise MpdeployError(f"ToMe r for block {i} is {v!r}, not an int; use whole numbers >= 0")
            v = iv
        if v < 0:
            raise MpdeployError(f"ToMe r for block {i} is {v}, which is negative; use r >= 0 (0 = no merging)")
        out.append(v)
    return out


def tome_token_counts(
    model_or_num_tokens: nn.Module | int,
    r: int | Sequence[int] | None = None,
    depth: int | None = None,
    num_prefix_tokens: int | None = None,
) -> list[int]:
    """Token counts through the network: entry i = tokens entering block i, last entry = tokens
    leaving the last block (so len == depth + 1, and entry i+1 = tokens after block i merged).

    `model_or_num_tokens` is a timm ViT (its patch count, prefix tokens and depth are used; `r`
    defaults to its stored `_tome_r`) or the initial token count including prefix tokens (then
    `depth` is required and `num_prefix_tokens` defaults to 1).
    """
    if isinstance(model_or_num_tokens, nn.Module):
        model = model_or_num_tokens
        n = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
        depth = len(model.blocks) if depth is None else depth
        prefix = int(model.num_prefix_tokens) if num_prefix_tokens is None else num_prefix_tokens
        if r is None:
            r = getattr(model, "_tome_r", 0)
    else:
        n = int(model_or_num_tokens)
        prefix = 1 if num_prefix_tokens is None else num_prefix_tokens
        if depth is None:
            raise MpdeployError("tome_token_counts needs depth when given a token count; pass depth=len(model.blocks)")
        if r is None:
            r = 0
    rs = _normalize_r(r, depth)
    counts = [n]
    for ri in rs:
        n -= merge_r_for_tokens(ri, n, prefix)
        counts.append(n)
    return counts


# --------------------------------------------------------------------------------------------
# the three pieces of a ToMe block: attention with sizes, matching, merging
# --------------------------------------------------------------------------------------------


def attention_with_size(attn: nn.Module, x: torch.Tensor, log_size: torch.Tensor | None):
    """timm `Attention` forward with log(size) added to the logits; also returns the merge metric.

    `log_size` is [B, N] (or None: plain attention). The metric is the keys averaged over heads,
    [B, N, head_dim]. Without a bias it follows timm's own choice of SDPA or explicit softmax.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    if log_size is None and attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        # Explicit softmax whenever there is a size bias: with a float attn_mask, torch 2.13's
        # dynamo ONNX exporter fails on SDPA (the CPU kernel's output strides at trace time differ
        # from its decomposition's, and the following reshape was recorded as a view). MatMul +
        # Add + Softmax is also what every ONNX backend, TensorRT included, handles.
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if log_size is not None:
            # [B, 1, 1, N]: the same bias for every head and every query, on the key axis
            logits = logits + log_size[:, None, None, :]
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v

    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    r: int,
    num_prefix_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `r` tokens of x [B, N, C] by bipartite soft matching on `metric` [B, N, D].

    `size` is [B, N, 1]. Returns (x, size) with N - r tokens ordered
    [prefix, unmerged A, B (with merged A folded in)]. `r` must already be clamped
    (see `merge_r_for_tokens`).
    """
    if r <= 0:
        return x, size
    p = num_prefix_tokens
    C = x.shape[-1]

    # cosine similarity between A (even patch positions) and B (odd patch positions)
    m = metric[:, p:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # an all-zero key must not give NaN
    scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
    na, nb = scores.shape[-2], scores.shape[-1]

    best_val, best_dst = scores.max(dim=-1)  # [B, Na]: each A token's best B partner
    # full descending order of A by match quality: first r are merged, the rest kept
    order = torch.topk(best_val, na, dim=-1, largest=True, sorted=True).indices
    src_idx, keep_idx = order[:, :r], order[:, r:]
    dst_idx = torch.gather(best_dst, 1, src_idx)  # [B, r]

    # work with size-weighted sums so a merge is a plain sum, then divide by the summed size
    xs = torch.cat([x * size, size], dim=-1)  # [B, N, C+1]
    prefix, rest = xs[:, :p], xs[:, p:]
    a, b = rest[:, 0::2], rest[:, 1::2]
    kept = torch.gather(a, 1, keep_idx.unsqueeze(-1).expand(-1, -1, C + 1))
    src = torch.gather(a, 1, src_idx.unsqueeze(-1).expand(-1, -1, C + 1))
    # one-hot assignment [B, Nb, r]: column i has a 1 in the row of src i's partner
    targets = torch.arange(nb, device=x.device, dtype=dst_idx.dtype).view(1, nb, 1)
    assign = (dst_idx.unsqueeze(1) == targets).to(xs.dtype)
    b = b + assign @ src

    out = torch.cat([prefix, kept, b], dim=1)
    new_size = out[..., C:]
    return out[..., :C] / new_size, new_size


def _static_len(x: torch.Tensor) -> int:
    """Token count as a Python int. The legacy ONNX tracer hands out sizes as tensors and warns
    when they become constants; here that is the point (static shapes), so silence it."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(x.shape[1])
    return int(x.shape[1])


def tome_block_forward(
    blk: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    num_prefix_tokens: int,
    prop_attn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm pre-norm `Block` with proportional attention and merging between attention and MLP."""
    if size is None and r <= 0:
        # nothing merged yet and nothing to merge here: the untouched timm path, bit for bit
        return blk(x), None
    log_size = size[..., 0].log() if (size is not None and prop_attn) else None
    a, metric = attention_with_size(blk.attn, blk.norm1(x), log_size)
    x = x + blk.drop_path1(blk.ls1(a))
    r_eff = merge_r_for_tokens(r, _static_len(x), num_prefix_tokens)
    if r_eff > 0:
        if size is None:
            size = torch.ones_like(x[..., :1])
        x, size = bipartite_merge(x, metric, size, r_eff, num_prefix_tokens)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


# --------------------------------------------------------------------------------------------
# patching the model
# --------------------------------------------------------------------------------------------


def _tome_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm `forward_features` with the ToMe blocks; returns tokens and their sizes (None if unmerged)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    size = None
    prop = getattr(model, "_tome_prop_attn", True)
    for blk, r in zip(model.blocks, model._tome_r):
        x, size = tome_block_forward(blk, x, size, r, model.num_prefix_tokens, prop)
    return model.norm(x), size


def _weighted_pool(model: nn.Module, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm `pool` for 'avg'/'avgmax' with tokens weighted by how many patches they stand for."""
    if not model.pool_include_prefix:
        x, size = x[:, model.num_prefix_tokens:], size[:, model.num_prefix_tokens:]
    mean = (x * size).sum(dim=1) / size.sum(dim=1)
    if model.global_pool == "avgmax":
        return 0.5 * (x.amax(dim=1) + mean)
    return mean


class ToMeMixin:
    """Overrides for a timm VisionTransformer (mixed in by `apply_tome`, do not use directly)."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _reject_masks(attn_mask, is_causal)
        return _tome_features(self, x)[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        _reject_masks(attn_mask, is_causal)
        x, size = _tome_features(self, x)
        if size is not None and self.attn_pool is None and self.global_pool in ("avg", "avgmax"):
            # same steps as timm forward_head, with a size-weighted average in place of the mean
            x = _weighted_pool(self, x, size)
            x = self.head_drop(self.fc_norm(x))
            return self.head(x)
        return self.forward_head(x)


def _reject_masks(attn_mask, is_causal) -> None:
    # `is True`: the legacy ONNX exporter passes the default is_causal=False in as a tensor
    if attn_mask is not None or is_causal is True:
        raise MpdeployError(
            "ToMe changes the token count inside the network, so attention masks do not apply; "
            "call the model without attn_mask/is_causal or remove ToMe with remove_tome(model)"
        )


_TOME_CLASSES: dict[type, type] = {}


def _tome_class(cls: type) -> type:
    """A subclass of the model's class with the ToMe overrides; registered in this module so
    `torch.save(model)` of a patched model pickles and loads (with mpdeploy importable)."""
    if issubclass(cls, ToMeMixin):
        return cls
    if cls not in _TOME_CLASSES:
        name = f"ToMe{cls.__name__}"
        if name in globals() and globals()[name].__mro__[2] is not cls:
            name = f"ToMe{cls.__module__.replace('.', '_')}_{cls.__name__}"
        new = type(name, (ToMeMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _TOME_CLASSES[cls] = new
    return _TOME_CLASSES[cls]


def _check_vit(model: nn.Module) -> None:
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is a hard dependency of the ViT path
        raise MpdeployError(f"ToMe needs timm ({e}); install it with `pip install timm`") from None
    if not isinstance(model, VisionTransformer):
        raise MpdeployError(
            f"ToMe applies to timm VisionTransformer models (vit_*, deit_*), not {type(model).__name__}; "
            f"drop --tome for this model"
        )
    for i, blk in enumerate(model.blocks):
        # our block forward re-implements timm's pre-norm Block and Attention exactly; other block
        # types (ResPostBlock, parallel blocks) or attention variants (RoPE) would be silently wrong
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise MpdeployError(
                f"ToMe supports timm's standard pre-norm Block with Attention; block {i} is "
                f"{type(blk).__name__} with {type(blk.attn).__name__}; drop --tome for this model"
            )
    if getattr(model, "attn_pool", None) is not None:
        logger.warning(
            "ToMe with attention pooling (global_pool=%r): the pool sees merged tokens without their "
            "sizes, so its output is an approximation", model.global_pool,
        )


def apply_tome(model: nn.Module, r: int | Sequence[int], prop_attn: bool = True) -> nn.Module:
    """Patch a timm VisionTransformer in place so block i merges r[i] tokens; returns the model.

    `r` is one int for every block or a list with one entry per block; r=0 everywhere reproduces
    the unpatched model exactly. Each r is clamped at run time to what the block can merge
    (see `merge_r_for_tokens`). The schedule is stored as `model._tome_r` (re-apply it after
    loading weights into a fresh model). `prop_attn=False` drops the log(size) attention bias
    (only useful for comparisons; proportional attention is what makes merged tokens faithful).
    Calling it again on a patched model replaces the schedule.
    """
    _check_vit(model)
    depth = len(model.blocks)
    rs = _normalize_r(r, depth)
    counts = tome_token_counts(model, rs)
    asked = sum(rs)
    merged = counts[0] - counts[-1]
    if merged < asked:
        logger.warning(
            "ToMe r=%s asks for %d merges but only %d fit (at least %d prefix token(s) + 1 must remain, "
            "and a block merges at most half its patch tokens); token counts: %s",
            rs, asked, merged, model.num_prefix_tokens, counts,
        )
    model.__class__ = _tome_class(type(model))
    model._tome_r = rs
    model._tome_prop_attn = bool(prop_attn)
    logger.info("ToMe applied: r=%s, tokens per block %s", rs, counts)
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo `apply_tome` (restores the original class; weights were never touched)."""
    cls = type(model)
    if issubclass(cls, ToMeMixin):
        model.__class__ = next(c for c in cls.__mro__[1:] if c is not ToMeMixin and not issubclass(c, ToMeMixin))
    for attr in ("_tome_r", "_tome_prop_attn"):
        model.__dict__.pop(attr, None)
    return model


# --------------------------------------------------------------------------------------------
# MAC accounting
# --------------------------------------------------------------------------------------------


def tome_macs(model: nn.Module, r: int | Sequence[int] | None, input_shape: Sequence[int]) -> dict:
    """Multiply-accumulates of one forward pass per image, computed from token counts.

    Counts: the patch-embedding conv; every nn.Linear in each block's attention (at the tokens
    entering the block) and MLP (at the tokens left after merging); the two attention matmuls
    q@k^T and attn@v (2 * N^2 * attn_dim per block); the ToMe matching (|A| x |B| x head_dim) and
    merge (|B| x r x (C+1)) matmuls; Linear layers outside the blocks (head) at one token each.
    Not counted: softmax, norms, GELU, adds, gathers, the final pooling. The batch size cancels.
    """
    depth = len(model.blocks)
    rs = _normalize_r(0 if r is None else r, depth)
    shape = list(input_shape)
    h, w = shape[-2], shape[-1]
    pe = model.patch_embed
    ph, pw = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size, pe.patch_size)
    num_patches = (h // ph) * (w // pw)
    prefix = int(model.num_prefix_tokens)
    counts = tome_token_counts(num_patches + prefix, rs, depth, prefix)

    conv = pe.proj
    embed = num_patches * conv.out_channels * (conv.in_channels // conv.groups) * ph * pw if isinstance(conv, nn.Conv2d) else 0
    in_blocks = set()
    blocks = 0
    attn_mm = 0
    merge = 0
    for i, blk in enumerate(model.blocks):
        n_in, n_out = counts[i], counts[i + 1]
        for mod in blk.attn.modules():
            if isinstance(mod, nn.Linear):
                blocks += n_in * mod.in_features * mod.out_features
                in_blocks.add(id(mod))
        for mod in blk.mlp.modules():
            if isinstance(mod, nn.Linear):
                blocks += n_out * mod.in_features * mod.out_features
                in_blocks.add(id(mod))
        attn_mm += 2 * n_in * n_in * blk.attn.attn_dim
        r_eff = n_in - n_out
        if r_eff > 0:
            t = n_in - prefix
            na, nb = (t + 1) // 2, t // 2
            dim = blk.norm1.normalized_shape[-1] if hasattr(blk.norm1, "normalized_shape") else blk.attn.qkv.in_features
            merge += na * nb * blk.attn.head_dim + nb * r_eff * (dim + 1)
    other = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in in_blocks and not name.startswith("blocks."):
            other += mod.in_features * mod.out_features
    total = embed + blocks + attn_mm + merge + other
    return {
        "total": total, "patch_embed": embed, "block_linear": blocks, "attention_matmul": attn_mm,
        "tome_merge": merge, "head": other, "token_counts": counts,
    }


def tome_mac_ratio(model: nn.Module, r: int | Sequence[int], input_shape: Sequence[int] = (1, 3, 224, 224)) -> float:
    """MACs with ToMe r divided by dense MACs (r=0), both counted by `tome_macs`."""
    return tome_macs(model, r, input_shape)["total"] / tome_macs(model, 0, input_shape)["total"]

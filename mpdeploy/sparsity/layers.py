"""Which layers can carry an N:M pattern, how many MACs each runs, and what inputs they see."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mpdeploy.sparsity.patterns import NM

logger = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path; the weight parameter is f"{name}.weight"
    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]
    groups: int = 1
    is_head: bool = False

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def reduction(self) -> int:
        """Length of the dimension N:M groups run along (Linear `in`, Conv `C_in` per group)."""
        return int(self.weight_shape[1])


def classifier_name(model: nn.Module) -> str | None:
    """Module path of the classifier head (timm's get_classifier, else the last Linear)."""
    head = None
    if hasattr(model, "get_classifier"):
        with contextlib.suppress(Exception):
            head = model.get_classifier()
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(head, PRUNABLE_TYPES) and id(head) in names:
        return names[id(head)]
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear / Conv2d with its geometry, in module order."""
    head = classifier_name(model)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            layers.append(LayerInfo(name, "linear", tuple(module.weight.shape), 1, name == head))
        elif isinstance(module, nn.Conv2d):
            layers.append(LayerInfo(name, "conv", tuple(module.weight.shape), module.groups, name == head))
    if not layers and not any(True for _ in model.parameters()):
        logger.warning("model has no parameters")
    return layers


def skip_reason(layer: LayerInfo, pattern: NM, include_head: bool = False) -> str | None:
    """Why `layer` cannot (or should not) take `pattern`; None if it is eligible."""
    if layer.is_head and not include_head:
        return "classifier head kept dense (pass --prune-head to include it)"
    if layer.kind == "conv" and layer.groups > 1:
        if layer.reduction == 1:
            return "depthwise conv (1 input channel per group): no reduction dimension to group"
        return f"grouped conv (groups={layer.groups}): sparse tensor cores do not run grouped convs"
    if layer.reduction < pattern.m:
        return f"reduction dimension {layer.reduction} is shorter than M={pattern.m} (e.g. an RGB input stem)"
    if layer.reduction % pattern.m:
        return f"reduction dimension {layer.reduction} is not a multiple of M={pattern.m}"
    return None


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "qkv") and hasattr(module, "num_heads") and "Attention" in type(module).__name__


def count_macs(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, int]:
    """MACs per Linear/Conv layer for one forward pass, plus `attention:<name>` entries for the
    q@k^T and attn@v products of timm attention blocks (2 * N^2 * C per image).

    Counted from the real tensor shapes seen by forward hooks, so token merging and any input
    size are accounted for without formulas.
    """
    macs: dict[str, int] = {}
    handles = []

    def linear_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            rows = x.numel() // x.shape[-1]
            macs[name] = macs.get(name, 0) + rows * module.in_features * module.out_features
        return hook

    def conv_hook(name):
        def hook(module, inputs, output):
            k = module.weight[0].numel()  # C_in/groups * kh * kw
            macs[name] = macs.get(name, 0) + output.numel() * k
        return hook

    def attention_hook(name):
        # Hooked on the attention's qkv Linear: it fires even when token merging replaces the block's
        # forward, and its input carries the real (possibly merged) token count.
        def hook(module, inputs, output):
            x = inputs[0]
            tokens = x.shape[-2]
            batch = x.numel() // (tokens * x.shape[-1])
            dim = module.out_features // 3
            macs[f"attention:{name}"] = macs.get(f"attention:{name}", 0) + 2 * batch * tokens * tokens * dim
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        if _is_attention(module) and isinstance(module.qkv, nn.Linear):
            handles.append(module.qkv.register_forward_hook(attention_hook(name)))
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(batch, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return macs


def reduction_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a 2-D [rows, K] matrix whose columns line up with the N:M groups.

    Conv inputs become channels-last pixels: exact for 1x1 convs, and for kxk convs the per-channel
    statistics every kernel position shares (the usual Wanda / block-cost approximation).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups > 1:
            raise ValueError("grouped convs have no shared reduction columns")
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise TypeError(f"not a prunable layer: {type(module).__name__}")


def capture_inputs(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[torch.Tensor],
    consume: Callable[[str, torch.Tensor], None],
    max_rows: int | None = 8192,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run calibration batches and hand each layer's 2-D reduction-aligned input to `consume`.

    Rows are subsampled to `max_rows` per batch (fixed seed) to bound memory on conv layers with
    large feature maps. Returns the number of batches run.
    """
    gen = torch.Generator().manual_seed(0)
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            x2d = reduction_inputs(module, inputs[0].detach()).float()
            if max_rows is not None and x2d.shape[0] > max_rows:
                idx = torch.randperm(x2d.shape[0], generator=gen)[:max_rows].to(x2d.device)
                x2d = x2d[idx]
            consume(name, x2d)
        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                count += 1
                if progress:
                    progress(count)
    finally:
        for h in handles:
            h.remove()
    return count

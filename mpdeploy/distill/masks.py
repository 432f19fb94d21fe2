"""Frozen masks: pruned weights get no update during distillation, and a run where any moved fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM, is_nm_compliant
from mpdeploy.sparsity.pruned import PrunedArtifact


@dataclass(frozen=True)
class FrozenMasks:
    """The student's keep-masks on its device, and what the final check compares against."""

    masks: dict[str, torch.Tensor]  # parameter name -> bool keep-mask
    patterns: dict[str, NM]
    masked: list[tuple[nn.Parameter, torch.Tensor]]  # (parameter, keep-mask in its dtype) for the gradients
    zero_before: dict[str, torch.Tensor]  # kept weights that were already exactly zero


def freeze_masks(student: nn.Module, art: PrunedArtifact, device: torch.device, pruned_dir: Path) -> FrozenMasks:
    masks = {k: v.to(device) for k, v in art.masks.items()}
    patterns = art.patterns()
    params = dict(student.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise MpdeployError(f"{pruned_dir}: masks for unknown parameters ({missing[0]}); re-run `mpdeploy prune`")
    masked = [(params[n], m.to(params[n].dtype)) for n, m in masks.items()]
    zero_before = {n: (params[n].detach() == 0) & m for n, m in masks.items()}
    return FrozenMasks(masks, patterns, masked, zero_before)


def zero_masked_grads(masked: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, keep in masked:
        if param.grad is not None:
            param.grad.mul_(keep)


def verify_masks(model: nn.Module, masks: dict[str, torch.Tensor], patterns: dict[str, NM],
                 zero_before: dict[str, torch.Tensor] | None = None) -> None:
    """Raise unless every masked weight is exactly its pattern and its zero set is the mask's complement.

    Kept weights that were already exactly zero before distillation (`zero_before`) may stay zero.
    """
    params = dict(model.named_parameters())
    bad = []
    for name, mask in masks.items():
        w = params[name].detach().cpu()
        pattern = patterns.get(name)
        mask = mask.cpu()
        zero = w == 0
        expected = ~mask
        if zero_before and name in zero_before:
            zero = zero & ~(mask & zero_before[name].cpu())
        if (pattern is not None and not is_nm_compliant(w, pattern)) or not torch.equal(zero, expected):
            drift = int((w[~mask] != 0).sum())
            bad.append(f"{name} ({drift} pruned weights became nonzero, pattern {pattern})")
    if bad:
        raise RuntimeError(f"internal error: masks changed during distillation: {'; '.join(bad[:5])}")


def verify_frozen(model: nn.Module, frozen: FrozenMasks) -> None:
    """verify_masks against the masks the run started with."""
    verify_masks(model, {k: v.cpu() for k, v in frozen.masks.items()}, frozen.patterns,
                 {k: v.cpu() for k, v in frozen.zero_before.items()})

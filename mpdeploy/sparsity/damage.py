"""Measured damage: what pruning one layer alone does to the model's outputs.

The `sensitivity` budgets replace each (layer, pattern) option's weight-space damage (the share of
squared saliency the mask removes) by its effect on the logits, measured on calibration images:
relative squared error ||z - z_dense||^2 / ||z_dense||^2 with only that layer pruned. This is the
audit's per-layer sensitivity map turned into a budget input; one forward pass per option, so it is
meant for models whose forward pass over `MAX_IMAGES` images is cheap relative to the prune.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from mpdeploy.sparsity.budgets import Candidate
from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM
from mpdeploy.sparsity.stats import MaskChoice

logger = logging.getLogger(__name__)

MAX_IMAGES = 64  # calibration images per forward pass: the measured effect is an average over these


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float().reshape(out.shape[0], -1)


def logit_damage(
    model: nn.Module,
    candidates: list[Candidate],
    choices: Mapping[tuple[str, NM], MaskChoice],
    calib: list[torch.Tensor],
    step: Callable[[str, int, int], None] | None = None,
) -> list[Candidate]:
    """Candidates whose option damages are the measured logit effect of that option alone (the model
    is left as it was). `choices` maps (layer name, pattern) to the mask the saliency picked."""
    if not calib:
        raise MpdeployError("the sensitivity budgets measure each layer's effect on the outputs and need "
                            "calibration data: pass --calib DIR|FILE|digits, or choose --budget mp")
    images = torch.cat(calib)[:MAX_IMAGES]
    total = sum(len(c.options) for c in candidates)
    done = 0
    measured = []
    with torch.no_grad():
        reference = _logits(model, images)
        scale = float((reference ** 2).sum()) or 1.0
        for cand in candidates:
            weight = model.get_submodule(cand.name).weight
            original = weight.detach().clone()
            options = []
            for pattern, _ in cand.options:
                choice = choices[(cand.name, pattern)]
                pruned = choice.weight if choice.weight is not None else original
                weight.copy_((pruned.to(weight.dtype) * choice.mask.to(weight.dtype)))
                try:
                    effect = float(((_logits(model, images) - reference) ** 2).sum()) / scale
                finally:  # the model is the caller's: never leave a layer pruned behind
                    weight.copy_(original)
                options.append((pattern, effect))
                done += 1
                if step:
                    step("sensitivity", done, total)
            measured.append(replace(cand, options=tuple(options)))
            logger.info("logit damage %s: %s", cand.name, ", ".join(f"{p} {d:.3g}" for p, d in options))
    return measured

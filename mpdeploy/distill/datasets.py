"""The images a run trains on and is scored on: the training split, and top-1 on the digits test split."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mpdeploy.distill.config import DistillConfig
from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line


def train_data(config: DistillConfig, manifest: dict[str, Any], num_outputs: int):
    """(training ImageData, test ImageData or None): a test split exists only for `digits`."""
    from mpdeploy.data import load_images

    shape = tuple(manifest["model"]["input_shape"])
    data = load_images(config.data, shape, split="train", data_config=manifest["model"].get("data_config") or {},
                       seed=config.seed)
    if len(data) == 0:
        raise MpdeployError(f"training data {config.data!r} holds no images; pass --data DIR|digits")
    if data.synthetic:
        logger.warning("distilling on synthetic noise with constant labels: a smoke run, not a recovery")
    elif data.num_classes != num_outputs:
        raise MpdeployError(
            f"{data.description} has {data.num_classes} classes but the model has {num_outputs} outputs; "
            "pass --data DIR, an ImageFolder of the model's own training classes"
        )
    test = load_images("digits", shape, split="test") if config.data == "digits" else None
    return data, test


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of `model` on `data` (an ImageData), in eval mode."""
    from mpdeploy.data import loader

    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader(data, batch_size):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(1, total)

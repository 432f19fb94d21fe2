"""The images a run trains on and is scored on: the training data (less a validation split carved from
it, which decides whether the distilled or the pruned weights are kept), and the labelled images top-1
is measured on before and after (`--eval-data`; digits' test split; else a sample of the training data)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mpdeploy.distill.config import DistillConfig
from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line


def train_data(config: DistillConfig, manifest: dict[str, Any], num_outputs: int):
    """(training ImageData, validation ImageData carved from it or None, the labelled ImageData top-1 is
    measured on or None for a synthetic run)."""
    from mpdeploy.models.data import load_images

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
    test = _eval_images(config, manifest, num_outputs, data)  # from the whole data, as before the carve
    train, validation = carve_validation(data, config.validation_fraction, config.seed)
    return train, validation, test


VALIDATION_MIN, VALIDATION_MAX = 50, 2000  # images: fewer says too little; more only costs time
MIN_TRAIN_FOR_VALIDATION = 200  # below this many images nothing is held out (and nothing is chosen)


def carve_validation(data, fraction: float, seed: int):
    """(training part, validation part or None): a seeded random `fraction` of labelled `data`
    (VALIDATION_MIN..VALIDATION_MAX images) held out of training. None for synthetic or unlabelled data,
    too few images to spare any, or fraction 0. The evaluation data never chooses: its top-1 is reported."""
    from torch.utils.data import Subset

    from mpdeploy.models.data import ImageData

    n = len(data)
    if fraction <= 0 or data.synthetic or data.num_classes is None or n < MIN_TRAIN_FOR_VALIDATION:
        return data, None
    n_val = min(VALIDATION_MAX, max(VALIDATION_MIN, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2)).tolist()
    validation = ImageData(Subset(data.dataset, order[:n_val]), data.kind, data.num_classes,
                           f"{n_val} images held out of the distillation data ({data.description})")
    train = ImageData(Subset(data.dataset, sorted(order[n_val:])), data.kind, data.num_classes,
                      f"{data.description}, less {n_val} validation images")
    return train, validation


EVAL_SAMPLE = 1024  # training images scored when no --eval-data is given


def _eval_images(config: DistillConfig, manifest: dict[str, Any], num_outputs: int, train):
    """The labelled ImageData top-1 is measured on, its `description` saying what it is; None for a
    synthetic smoke run without --eval-data."""
    from mpdeploy.models.data import load_images

    shape = tuple(manifest["model"]["input_shape"])
    data_config = manifest["model"].get("data_config") or {}
    if config.eval_data:
        data = load_images(config.eval_data, shape, split="test", data_config=data_config, seed=config.seed)
        if data.num_classes is None or data.synthetic:
            raise MpdeployError(f"--eval-data {config.eval_data!r} has no labels; top-1 needs labelled images "
                                "(an ImageFolder, digits, or a tensor file with `labels`)")
        if data.num_classes > num_outputs:
            raise MpdeployError(f"--eval-data {data.description} has {data.num_classes} classes but the model has "
                                f"{num_outputs} outputs; pass images of the model's own classes")
        return data
    if config.data == "digits":
        return load_images("digits", shape, split="test")
    if train.synthetic:
        return None
    data = load_images(config.data, shape, split="train", data_config=data_config, limit=EVAL_SAMPLE,
                       seed=config.seed + 1)
    data.description = (f"a sample of the training data ({len(data)} images; not held out: pass --eval-data "
                        "for held-out images)")
    return data


@torch.no_grad()
def evaluate(model: nn.Module, data, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of `model` on `data` (an ImageData), in eval mode."""
    from mpdeploy.models.data import loader

    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader(data, batch_size):
        pred = model(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(1, total)

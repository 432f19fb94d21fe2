"""The prune's calibration data: the batches the statistics come from, the held-out slice, and the
dtype their forward passes run in."""

from __future__ import annotations

import logging
from typing import Any

import torch

from mpdeploy.core.errors import MpdeployError
from mpdeploy.models.spec import LoadedModel
from mpdeploy.sparsity.calib_precision import native_bf16, resolve_forward_dtype

logger = logging.getLogger(__name__)
SYNTHETIC_WARNING = "synthetic noise calibration: for smoke runs only, saliency and restore are not meaningful"


def load_calibration(source: str | None, n_batches: int, batch_size: int, seed: int, loaded: LoadedModel
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """(calibration batches, held-out batches, description) of `source` (None: no calibration)."""
    if not source:
        return [], [], {"kind": None}
    from mpdeploy.models.data import input_batches, load_images

    data = load_images(source, loaded.input_shape, split="calib", data_config=loaded.data_config,
                       limit=2 * n_batches * batch_size, seed=seed)
    batches = list(input_batches(data, batch_size))
    if not batches:
        raise MpdeployError(f"calibration source {source!r} holds no images")
    # Hold out a slice so restore is judged on inputs it did not fit: a quarter of the calibration
    # batches (fewer from a small source), from the end.
    n_hold = max(1, min(len(batches) // 4, n_batches // 4)) if len(batches) > 1 else 0
    calib, held = batches[: len(batches) - n_hold], batches[len(batches) - n_hold :]
    calib = calib[:n_batches]
    info = {"kind": data.kind, "description": data.description, "images": sum(len(b) for b in calib),
            "held_out_images": sum(len(b) for b in held)}
    if data.synthetic:
        info["warning"] = SYNTHETIC_WARNING
        logger.warning(info["warning"])
    return calib, held, info


def choose_forward_dtype(requested: str, macs_per_image: int, info: dict[str, Any]) -> str:
    """The calibration forward passes' dtype, recorded with its reason in `info` (the manifest's)."""
    dtype, why = resolve_forward_dtype(requested, macs_per_image, native_bf16())
    info.update(forward_dtype=dtype, forward_dtype_reason=why)
    logger.info("calibration forward passes in %s (%s)", dtype, why)
    return dtype

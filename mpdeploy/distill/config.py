"""What a distill run is: its frozen config, the paper's defaults, and the settings they resolve to."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line

OPTIMIZERS = ("adamw", "sgd")
# The paper's settings (ImageNet-1k, 3 epochs, batch 256): ViT AdamW 1e-5, ResNet SGD 1e-3.
PAPER_LR = {"adamw": 1e-5, "sgd": 1e-3}
PAPER_STEPS = 3 * math.ceil(1_281_167 / 256)  # optimizer steps of that schedule (15,015)
# A short run on a small set takes far fewer steps than the paper's, so the default lr is scaled up by
# the step ratio, capped: chosen on the digits zoo models (see docs/distill.md), not validated elsewhere.
MAX_LR_SCALE = 100.0
WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
SGD_MOMENTUM = 0.9
KIND = "distilled"  # its own artifact kind; its source ("pruned") is the artifact it recovered
DEFAULT_OUT = "distilled"  # beside the input: engines/<name>/pruned -> engines/<name>/distilled
# Fields that change how, not what, a run computes: left out of the reuse key.
RUN_ONLY_FIELDS = ("resume", "device")


@dataclass(frozen=True)
class DistillConfig:
    data: str = "digits"  # "digits" | ImageFolder dir | "synthetic" (smoke runs only)
    epochs: int = 3
    batch_size: int | None = None  # global batch; None -> 64 on CPU, 256 on GPU
    lr: float | None = None  # None -> paper lr scaled by step count (see default_lr)
    optimizer: str | None = None  # "adamw" | "sgd"; None -> sgd with BatchNorm, else adamw
    alpha: float = 0.5
    temperature: float = 2.0
    label_smoothing: float = 0.1
    amp: bool | None = None  # None -> on for CUDA, off for CPU
    seed: int = 0
    teacher: str | None = None  # None -> the artifact's dense.safetensors; else a model source
    # Labelled images top-1 is measured on before and after; None -> digits' test split for `digits`,
    # else a fixed sample of the training data (said so in the record).
    eval_data: str | None = None
    # Share of the (labelled) distillation data held out to choose between the distilled and the pruned
    # weights (the better one is kept); 0 holds nothing out and always keeps the distilled weights.
    validation_fraction: float = 0.1
    resume: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise MpdeployError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise MpdeployError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise MpdeployError(f"--lr must be positive, got {self.lr}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise MpdeployError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise MpdeployError(f"--alpha weighs KD against CE and must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise MpdeployError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MpdeployError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise MpdeployError(f"the validation fraction must be in [0, 1) (0: keep the distilled weights "
                                f"without a check), got {self.validation_fraction}")


def default_optimizer(model: nn.Module) -> tuple[str, str]:
    """(optimizer, why): SGD for models with BatchNorm (the paper's ResNet recipe), AdamW otherwise
    (ViTs, ConvNeXts and other LayerNorm models, and anything unrecognised: at the scaled-up default lr,
    SGD 0.1 wrecked a user's own 1-block ViT in one epoch, 95.7% -> 24.9%; it was picked by timm
    attribute names before)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "sgd", "the model has BatchNorm layers (the paper's CNN recipe)"
    return "adamw", "no BatchNorm layers (the paper's ViT recipe)"


def default_lr(optimizer: str, total_steps: int) -> tuple[float, str]:
    """(lr, how it was chosen): the paper's lr times min(MAX_LR_SCALE, PAPER_STEPS / total_steps).

    Why up to 100x the paper's lr: the paper's 3 epochs are ~15k steps; a short run (digits: 60 steps)
    with the paper's lr barely moves. Measured (benchmarks/results/distill_digits.md, 3 epochs, top-1 on
    the digits test split): ViT x1 94.25, x10 96.47, x30 96.66, x100 (this rule) 96.66, x300 94.62;
    CNN x1 99.26, x10 99.44, x30 99.44, x100 99.44, x300 98.33. The cap sits at the top of the plateau,
    below where x300 starts to hurt. Long runs (>= PAPER_STEPS steps) get the paper's lr unchanged."""
    scale = min(MAX_LR_SCALE, max(1.0, PAPER_STEPS / max(1, total_steps)))
    rule = f"paper {PAPER_LR[optimizer]:g} x {scale:.3g} (paper steps {PAPER_STEPS} / {total_steps} steps, cap {MAX_LR_SCALE:g})"
    return PAPER_LR[optimizer] * scale, rule


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast only does bf16


def resolve_settings(config: DistillConfig, student: nn.Module, device: torch.device, n_train: int,
                     world: int) -> dict:
    """Fill in the None defaults; the result is recorded in the manifest and keys the checkpoint."""
    optimizer, optimizer_rule = (config.optimizer, "given") if config.optimizer else default_optimizer(student)
    batch = config.batch_size or (256 if device.type == "cuda" else 64)
    per_rank = batch // world
    if per_rank < 1:
        raise MpdeployError(f"--batch-size {batch} is smaller than the {world} processes; raise it to at least {world}")
    if per_rank * world != batch:
        logger.warning("global batch %d is not divisible by %d processes; using %d", batch, world, per_rank * world)
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / per_rank)
    total_steps = steps_per_epoch * config.epochs
    if config.lr is not None:
        lr, rule = config.lr, "given"
    else:
        lr, rule = default_lr(optimizer, total_steps)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    dtype = amp_dtype(device, amp)
    return {
        "optimizer": optimizer, "optimizer_rule": optimizer_rule, "lr": lr, "lr_rule": rule, "schedule": "cosine per step to 0",
        "weight_decay": WEIGHT_DECAY[optimizer], "momentum": SGD_MOMENTUM if optimizer == "sgd" else None,
        "batch_size": per_rank * world, "batch_per_process": per_rank, "world_size": world,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "amp": amp, "amp_dtype": str(dtype).removeprefix("torch.") if dtype else None, "device": device.type,
    }


def reuse_config(config: DistillConfig) -> dict[str, Any]:
    """The config a distilled manifest records and its reuse key hashes (run-only fields left out)."""
    return {k: v for k, v in artifacts.to_jsonable(asdict(config)).items() if k not in RUN_ONLY_FIELDS}


def run_key(config: DistillConfig, settings: dict[str, Any], pruned_dir: Path) -> str:
    """What a checkpoint must have been made with to be resumed: config, resolved settings, input."""
    return artifacts.sha256_json({
        "config": reuse_config(config),
        "settings": {k: v for k, v in settings.items() if k != "device"},
        "input": artifacts.manifest_hash(pruned_dir),
    })


def default_out(pruned_dir: Path) -> Path:
    return Path(pruned_dir).parent / DEFAULT_OUT

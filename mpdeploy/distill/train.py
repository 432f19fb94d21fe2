"""The training loop: KD loss, optimizer and schedule, one step and one epoch, masks held frozen."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.distill.config import SGD_MOMENTUM, DistillConfig
from mpdeploy.distill.distributed import Dist, share_epoch
from mpdeploy.distill.masks import FrozenMasks, zero_masked_grads
from mpdeploy.sparsity.pruned import apply_masks

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line

# progress(step, done, total, **metrics): metrics carry epoch, loss (running mean) and images_per_s.
Progress = Callable[..., None]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float = 0.5, temperature: float = 2.0, label_smoothing: float = 0.1) -> torch.Tensor:
    """a*T^2*KL(p_t || p_s) at temperature T (batch mean) + (1-a)*CE(labels, smoothing)."""
    t = temperature
    # float32 so the softmax stays accurate under autocast.
    s, z = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(z / t, dim=-1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, labels, label_smoothing=label_smoothing)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def build_optimizer(student: nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    # No decay on biases / norms / embeddings (1-D and the ViT tokens): standard for fine-tuning.
    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=settings["lr"])
    return torch.optim.SGD(groups, lr=settings["lr"], momentum=SGD_MOMENTUM)


@dataclass
class Training:
    """What the loop steps, and what a checkpoint saves and restores."""

    student: nn.Module
    teacher: nn.Module
    frozen: FrozenMasks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    dtype: torch.dtype


def new_training(student: nn.Module, teacher: nn.Module, frozen: FrozenMasks, settings: dict[str, Any],
                 device: torch.device) -> Training:
    """Optimizer, cosine-to-0 per-step schedule and grad scaler (fp16 autocast only) for the settings."""
    dtype = torch.float16 if settings["amp_dtype"] == "float16" else torch.bfloat16
    amp = bool(settings["amp"])
    optimizer = build_optimizer(student, settings)
    total_steps = settings["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    return Training(student, teacher, frozen, optimizer, scheduler, scaler, device, amp, dtype)


def epoch_batches(train, settings: dict[str, Any], dist: Dist, seed: int, device: torch.device):
    """(sampler, loader) over this rank's shard of the training set."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    # One sampler for both paths: the order depends only on (seed, epoch), so a resumed run sees
    # exactly the batches the interrupted one would have.
    sampler = DistributedSampler(train.dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    batches = DataLoader(train.dataset, batch_size=settings["batch_per_process"], sampler=sampler, num_workers=0,
                         pin_memory=device.type == "cuda")
    return sampler, batches


def train_step(training: Training, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               config: DistillConfig) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns its loss."""
    t = training
    with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.amp):
        with torch.no_grad():
            t_logits = t.teacher(x)
        s_logits = model(x)
    loss = kd_loss(s_logits, t_logits, y, config.alpha, config.temperature, config.label_smoothing)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)
    zero_masked_grads(t.frozen.masked)  # pruned weights get no update, not even momentum
    t.scaler.step(t.optimizer)
    t.scaler.update()
    apply_masks(t.student, t.frozen.masks)  # and are forced back to zero whatever the optimizer did
    t.scheduler.step()
    return loss


def run_epoch(training: Training, model: nn.Module, sampler, batches, epoch: int, config: DistillConfig,
              dist: Dist, progress: Progress) -> dict[str, Any]:
    """Train one epoch (0-based `epoch`); returns its record, summed over ranks."""
    device = training.device
    sampler.set_epoch(epoch)
    model.train()
    label = f"epoch {epoch + 1}/{config.epochs}"
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, t0 = 0, time.perf_counter()
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = train_step(training, model, x, y, config)
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
        rate = seen * dist.world / max(1e-9, time.perf_counter() - t0)
        progress(label, i + 1, len(batches), epoch=epoch + 1, loss=float(loss_sum) / seen, images_per_s=rate)
    seconds = time.perf_counter() - t0
    totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    share_epoch(totals, training.student, dist)
    record = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "images": int(totals[1]),
              "seconds": round(seconds, 3), "images_per_s": round(float(totals[1]) / max(1e-9, seconds), 1),
              "lr_end": training.scheduler.get_last_lr()[0]}
    if dist.main:
        logger.info("%s: loss %.4f, %.0f images/s, %.1f s", label, record["loss"], record["images_per_s"], seconds)
    return record

"""The distill stage itself: pruned artifact in, `distilled/` artifact out; its steps in the order they run."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mpdeploy.core import artifacts
from mpdeploy.distill.artifact import dump_state_hash, write_artifact
from mpdeploy.distill.checkpoint import checkpoint_dir, load_checkpoint, restore_training, save_training
from mpdeploy.distill.config import KIND, DistillConfig, default_out, resolve_settings, run_key
from mpdeploy.distill.datasets import evaluate, train_data
from mpdeploy.distill.distributed import Dist, init_distributed, pick_device, wrap_for_ranks
from mpdeploy.distill.masks import freeze_masks, verify_frozen
from mpdeploy.distill.teacher import frozen_teacher, matching_outputs
from mpdeploy.distill.train import Progress, Training, epoch_batches, new_training, run_epoch
from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.pruned import PrunedArtifact, load_pruned

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line


def distill(pruned_dir: Path, config: DistillConfig, out_dir: Path | None = None,
            progress: Progress | None = None) -> Path:
    """Distill the dense teacher into the pruned student; write a `distilled/` artifact (source: the input).

    The input is never rewritten: the default output is `distilled/` beside it. Under torchrun every
    rank calls this; rank 0 writes checkpoints and the artifact, and every rank returns the output path.
    """
    pruned_dir = Path(pruned_dir)
    target = Path(out_dir) if out_dir is not None else default_out(pruned_dir)
    src, dst = pruned_dir.resolve(), target.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise MpdeployError(f"--out {target} overlaps the input artifact {pruned_dir}; distillation writes a new "
                            "artifact and never rewrites its input: choose a sibling folder")
    art = load_pruned(pruned_dir, which="sparse")  # checks the file hashes and the chain too
    artifacts.check_replaceable(target, KIND)  # refuse a user's folder before hours of training
    device = pick_device(config.device)
    dist = init_distributed(device)
    try:
        return _distill(pruned_dir, target, art, config, device, dist, progress)
    finally:
        if dist.created:
            torch.distributed.destroy_process_group()


def _distill(pruned_dir: Path, target: Path, art: PrunedArtifact, config: DistillConfig, device: torch.device,
             dist: Dist, progress: Progress | None) -> Path:
    """Every rank trains and checks its masks; rank 0 also checkpoints and writes the artifact."""
    torch.manual_seed(config.seed)
    student = art.model.to(device)
    frozen = freeze_masks(student, art, device, pruned_dir)
    teacher, teacher_record = frozen_teacher(config, pruned_dir, art.manifest, device)
    num_outputs = matching_outputs(student, teacher, art.input_shape, config.teacher, device)
    train, validation, test = train_data(config, art.manifest, num_outputs)
    settings = resolve_settings(config, student, device, len(train), dist.world)
    key = run_key(config, settings, pruned_dir)
    before = {}
    if test is not None:
        before = {"student": evaluate(student, test, device), "teacher": evaluate(teacher, test, device)}
    pruned_state = _cpu_state(student) if validation is not None else None
    val_before = evaluate(student, validation, device) if validation is not None else None

    training = new_training(student, teacher, frozen, settings, device)
    ckpt = checkpoint_dir(target)
    start, records = _resume(training, config, dist, ckpt, key, pruned_dir) if config.resume else (0, [])
    _train_epochs(training, train, settings, start, records, config, dist, (ckpt, key),
                  progress or (lambda *a, **k: None))

    student.eval()
    verify_frozen(student, frozen)  # no artifact unless every pruned weight is still zero
    after = {"student": evaluate(student, test, device)} if test is not None else {}
    state = _cpu_state(student)
    choice = _keep_the_better(validation, val_before, evaluate(student, validation, device) if validation is not None else None)
    if choice["kept"] == "pruned":
        state = pruned_state
        after["distilled"], after["student"] = after.get("student"), before.get("student")
    dump_state_hash(state, dist)

    if dist.main:
        result = {
            "config": {**asdict(config), "resolved": settings},
            "teacher": teacher_record,
            "data": train.description,
            "epochs": records,
            "resumed_from_epoch": start or None,
            "top1_before": before.get("student"),
            "top1_after": after.get("student"),  # of the weights kept (see "selection")
            "top1_distilled": after.get("distilled", after.get("student")),
            "top1_teacher": before.get("teacher"),
            "selection": choice,
            "top1_split": test.description if test is not None else None,
            "input_manifest_sha256": artifacts.manifest_hash(pruned_dir),
        }
        write_artifact(pruned_dir, target, art.manifest, state, result, config)
        shutil.rmtree(ckpt, ignore_errors=True)
        if test is not None:
            logger.info("top-1 on %s: %.2f%% -> %.2f%% (teacher %.2f%%)", test.description,
                        before["student"], after["student"], before["teacher"])
    dist.barrier()
    return target


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _keep_the_better(validation, before: float | None, after: float | None) -> dict[str, Any]:
    """Which weights the artifact keeps: the distilled ones, unless they score lower than the pruned ones
    on the validation images held out of the distillation data (a tie keeps the distilled weights).
    The evaluation data (--eval-data, digits' test split) never decides: its top-1 is only reported."""
    if validation is None:
        return {"kept": "distilled", "why": "no validation split (synthetic, unlabelled or too few images)",
                "validation": None, "val_top1_before": None, "val_top1_after": None}
    kept = "pruned" if after < before else "distilled"
    logger.info("kept the %s weights: validation top-1 %.2f%% before distillation, %.2f%% after (%s)",
                kept, before, after, validation.description)
    return {"kept": kept, "why": "validation top-1 " + ("fell" if kept == "pruned" else "did not fall"),
            "validation": validation.description, "val_top1_before": before, "val_top1_after": after}


def _resume(training: Training, config: DistillConfig, dist: Dist, ckpt: Path, key: str,
            pruned_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """(epochs done, their records) restored from this run's checkpoint, else (0, [])."""
    dist.barrier()  # every rank sees the same checkpoint folder
    loaded = load_checkpoint(ckpt, key)
    if loaded is None:
        return 0, []
    state, records = loaded
    start = restore_training(training, state)
    if dist.main:
        logger.info("resuming %s from epoch %d/%d (%s)", pruned_dir, start, config.epochs, ckpt)
    return start, records[:start]


def _train_epochs(training: Training, train, settings: dict[str, Any], start: int, records: list[dict[str, Any]],
                  config: DistillConfig, dist: Dist, checkpoint: tuple[Path, str], progress: Progress) -> None:
    """Epochs `start`..end, each appended to `records` and checkpointed (folder, key) by rank 0."""
    sampler, batches = epoch_batches(train, settings, dist, config.seed, training.device)
    model = wrap_for_ranks(training.student, dist, training.device)
    for epoch in range(start, config.epochs):
        records.append(run_epoch(training, model, sampler, batches, epoch, config, dist, progress))
        if dist.main:
            save_training(*checkpoint, training, epoch + 1, records)
        dist.barrier()

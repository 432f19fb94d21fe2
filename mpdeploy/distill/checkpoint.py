"""Per-epoch checkpoints beside the output folder, so an interrupted run resumes from its last finished epoch.

    <parent>/.distill-ckpt-<name>/state.pt    model, optimizer, scheduler, scaler, RNG states, epochs_done
    <parent>/.distill-ckpt-<name>/meta.json   {"key", "epochs_done", "epochs": per-epoch records}

A checkpoint is resumed only under the same key (config, resolved settings, input manifest).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core import artifacts
from mpdeploy.distill.train import Training

logger = logging.getLogger(__package__)  # the stage's logger: the CLI prints its name on every line


def checkpoint_dir(target: Path) -> Path:
    return target.parent / f".distill-ckpt-{target.name}"


def save_checkpoint(ckpt: Path, key: str, student: nn.Module, optimizer, scheduler, scaler, epochs_done: int,
                    records: list[dict[str, Any]]) -> None:
    state = {
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epochs_done": epochs_done,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with artifacts.atomic_dir(ckpt, replace_any=True) as tmp:
        torch.save(state, tmp / "state.pt")
        artifacts.write_json(tmp / "meta.json", {"key": key, "epochs_done": epochs_done, "epochs": records})


def save_training(ckpt: Path, key: str, training: Training, epochs_done: int, records: list[dict[str, Any]]) -> None:
    save_checkpoint(ckpt, key, training.student, training.optimizer, training.scheduler, training.scaler,
                    epochs_done, records)


def load_checkpoint(ckpt: Path, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(state, epoch records) of the checkpoint made under `key`; None if absent, other key or damaged."""
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = artifacts.read_json(meta_path, "distill checkpoint")
        if meta.get("key") != key:
            logger.warning("ignoring checkpoint %s: made with another config or input; starting over", ckpt)
            return None
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged checkpoint costs the epochs it held, never the run
        logger.warning("ignoring unreadable checkpoint %s (%s); starting over", ckpt, exc)
        return None
    return state, list(meta.get("epochs", []))


def restore_training(training: Training, state: dict[str, Any]) -> int:
    """Load a checkpoint's state into `training` (RNG included); returns the epochs it had done."""
    training.student.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    training.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and training.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["epochs_done"])

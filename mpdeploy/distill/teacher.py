"""The teacher: the artifact's dense twin (default) or any model source with the student's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.distill.config import DistillConfig
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import PrunedFolder
from mpdeploy.sparsity.pruned import load_pruned


def load_teacher(config: DistillConfig, pruned_dir: Path, manifest: dict[str, Any]) -> tuple[nn.Module, dict]:
    """(teacher, the manifest's record of it): `dense.safetensors` of the input, or `config.teacher`."""
    if config.teacher is None:
        dense = load_pruned(pruned_dir, which="dense", verify=False).model
        file = PrunedFolder.WEIGHTS["dense"]
        record = {"kind": "artifact", "file": file, "sha256": manifest.get("files", {}).get(file),
                  "model": manifest["model"]["source"]}
        return dense, record
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.models.load import load_model

    loaded = load_model(ModelSpec(source=config.teacher, input_shape=tuple(manifest["model"]["input_shape"])))
    return loaded.module, {"kind": "model", "spec": config.teacher, "source": loaded.source}


def frozen_teacher(config: DistillConfig, pruned_dir: Path, manifest: dict[str, Any],
                   device: torch.device) -> tuple[nn.Module, dict]:
    """load_teacher, on `device`, in eval mode and without gradients."""
    teacher, record = load_teacher(config, pruned_dir, manifest)
    return teacher.to(device).eval().requires_grad_(False), record


def matching_outputs(student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], teacher_spec: str | None,
                     device: torch.device) -> int:
    """The number of outputs student and teacher share; refuses a teacher of other classes.

    Leaves the student in eval mode."""
    with torch.no_grad():
        probe = torch.zeros(2, *input_shape, device=device)
        s_out, t_out = student.eval()(probe), teacher(probe)
    if s_out.shape != t_out.shape:
        raise MpdeployError(
            f"teacher {teacher_spec!r} outputs {tuple(t_out.shape[1:])} but the student outputs "
            f"{tuple(s_out.shape[1:])}; pass a teacher with the same classes"
        )
    return int(s_out.shape[-1])

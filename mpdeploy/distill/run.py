"""The distill stage under the one reuse rule (`mpdeploy.core.runner`); `mpdeploy build` runs it from here."""

from __future__ import annotations

from pathlib import Path

from mpdeploy.core import artifacts
from mpdeploy.core.runner import StageResult, run_stage, step_progress


def distill_stage(distill_config, pruned: Path, folder: Path, force: bool, progress) -> StageResult:
    """Short recovery into its own `distilled/` artifact (source: `pruned/`, which stays as pruning left it)."""
    from mpdeploy.distill.config import KIND, reuse_config
    from mpdeploy.distill.stage import distill

    result = run_stage("distill", folder, KIND, reuse_config(distill_config), force=force,
                       sources={"pruned": pruned},
                       make=lambda: distill(pruned, distill_config, out_dir=folder,
                                            progress=step_progress(progress, "distill")))
    record = artifacts.read_manifest(folder, KIND, verify=False)["distill"]
    result.details = {"epochs": distill_config.epochs, "top1_before": record.get("top1_before"),
                      "top1_after": record.get("top1_after"), "top1_teacher": record.get("top1_teacher")}
    return result

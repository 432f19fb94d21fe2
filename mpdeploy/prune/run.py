"""The prune stage under the one reuse rule (`mpdeploy.core.runner`); `mpdeploy build` runs it from here."""

from __future__ import annotations

from pathlib import Path

from mpdeploy.core import artifacts
from mpdeploy.core.runner import StageResult, run_stage, step_progress


def prune_stage(loaded, model_hash: str, prune_config, folder: Path, force: bool, progress) -> StageResult:
    from mpdeploy.prune.stage import prune

    result = run_stage("prune", folder, "pruned", prune_config, force=force, inputs={"model": model_hash},
                       make=lambda: prune(loaded, prune_config, folder, progress=step_progress(progress, "prune"),
                                          source_hash=model_hash))
    manifest = artifacts.read_manifest(folder, "pruned", verify=False)
    totals = manifest["totals"]
    result.details = {k: totals.get(k) for k in ("pruned_layers", "sparse_layers", "skipped_layers",
                                                 "mac_reduction", "sparse_execution_mac_reduction")}
    pruned_for = manifest.get("pruned_for")
    if pruned_for:
        result.details["pruned_for"] = pruned_for["backend"]
        result.details["kept_dense_for_backend"] = len(pruned_for.get("runs_dense") or {})
    return result

"""The export stage under the one reuse rule (`mpdeploy.core.runner`); `mpdeploy build` runs it from here."""

from __future__ import annotations

from pathlib import Path

from mpdeploy.core import artifacts
from mpdeploy.core.runner import StageResult, run_stage, step_progress


def export_stage(export_config, weights: Path, folder: Path, force: bool, progress) -> StageResult:
    from mpdeploy.export.stage import export

    step = step_progress(progress, "export")

    def make() -> None:
        step("export", 0, 1)
        export(weights, export_config, folder)

    result = run_stage("export", folder, "onnx", export_config, make, force=force,
                       inputs={"pruned_manifest": artifacts.manifest_hash(weights)}, sources={"weights": weights})
    step("export", 1, 1)
    manifest = artifacts.read_manifest(folder, "onnx", verify=False)
    summary = manifest.get("summary") or {}
    result.details = {k: summary.get(k) for k in ("annotated", "runs_sparse", "eligible_2_4")}
    result.details["ort_max_abs_diff"] = (manifest.get("ort_check") or {}).get("max_abs_diff_sparse")
    return result

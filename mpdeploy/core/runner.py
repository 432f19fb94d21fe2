"""One stage runner and one reuse rule for every stage of the chain.

A stage is (output folder, artifact kind, config, inputs, sources, make). It is reused when its folder
is a verified artifact of that kind (every file hashed, nothing unlisted, its sources unchanged) made
from the same config hash and the same input hashes (`artifacts.is_complete`); otherwise `make` writes
it through `artifacts.atomic_dir`, which first removes temporaries of killed earlier runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass
class StageResult:
    stage: str
    status: str  # "built" | "reused" | "skipped"
    seconds: float
    path: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)


def step_progress(progress: Progress | None, prefix: str) -> Progress:
    """Prefix a stage's progress steps; extra fields (loss, images/s, ...) pass through."""
    if progress is None:
        return lambda step, done, total, **fields: None
    return lambda step, done, total, **fields: progress(
        f"{prefix}: {step}" if step != prefix else prefix, done, total, **fields)


def run_stage(name: str, folder: Path, kind: str, config: Any, make: Callable[[], Any], force: bool = False,
              inputs: Mapping[str, str] | None = None, sources: Mapping[str, Path] | None = None) -> StageResult:
    """Reuse `folder` if the one reuse rule holds, else call `make()` (which writes it atomically)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    artifacts.clean_stale_temps(folder)
    key = artifacts.config_hash(config)
    if not force and artifacts.is_complete(folder, kind, key, inputs or {}, sources):
        logger.info("%s: reusing %s (same config and inputs)", name, folder)
        status = "reused"
    else:
        make()
        status = "built"
    return StageResult(name, status, time.perf_counter() - t0, folder)


# ---------------------------------------------------------------------------------------------------
# the stages of `mpdeploy build` (engines: mpdeploy.engine.stage)


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


def distill_stage(distill_config, pruned: Path, folder: Path, force: bool, progress) -> StageResult:
    """Short recovery into its own `distilled/` artifact (source: `pruned/`, which stays as pruning left it)."""
    from mpdeploy.distill import KIND, distill, reuse_config

    result = run_stage("distill", folder, KIND, reuse_config(distill_config), force=force,
                       sources={"pruned": pruned},
                       make=lambda: distill(pruned, distill_config, out_dir=folder,
                                            progress=step_progress(progress, "distill")))
    record = artifacts.read_manifest(folder, KIND, verify=False)["distill"]
    result.details = {"epochs": distill_config.epochs, "top1_before": record.get("top1_before"),
                      "top1_after": record.get("top1_after"), "top1_teacher": record.get("top1_teacher")}
    return result


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


def audit_stage(engine_dir: Path, audit_config, runtime, force: bool, progress) -> StageResult:
    """Audit `engine_dir` into `audit/` beside it; reused when engine, weights and config are the same."""
    from mpdeploy.audit import audit
    from mpdeploy.audit.stage import audit_inputs, audit_sources
    from mpdeploy.core.kinds import EngineFolder

    engine = EngineFolder.open(engine_dir)
    root, sources = Path(engine_dir).parent, audit_sources(engine)
    step = step_progress(progress, "audit")

    def make() -> None:
        step("audit", 0, 1)
        audit(root, audit_config, progress=step, runtime=runtime)

    result = run_stage("audit", root / "audit", "audit", asdict(audit_config), make, force=force,
                       inputs=audit_inputs(engine), sources=sources)
    step("audit", 1, 1)
    data = artifacts.read_json(result.path / "audit.json", what="audit")
    result.details = {"passed": data.get("passed"), "failures": data.get("failures") or [],
                      "summary": data.get("summary") or {}}
    return result


def densify_stage(engine_dir: Path, folder: Path, densify_config, force: bool, progress) -> StageResult:
    """Give the layers the engine ran dense their dense weights back, into `folder` (a pruned artifact).

    Skipped (nothing written) when every pruned layer ran sparse; reused like every stage."""
    from mpdeploy.densify.evidence import add_slow_layers, read_slow_layers
    from mpdeploy.densify.stage import densify, file_inputs, gather, open_input
    from mpdeploy.densify.stage import reuse_config as densify_config_record

    t0 = time.perf_counter()
    step = step_progress(progress, "densify")
    step("densify", 0, 1)
    weights, evidence, sources = gather(open_input(engine_dir), densify_config)
    if densify_config.slow_layers:
        slow = Path(densify_config.slow_layers)
        evidence = add_slow_layers(evidence, read_slow_layers(slow), slow.name)
    details = {"source": evidence.source, "returned": dict(evidence.ran_dense), "ran_sparse": list(evidence.ran_sparse),
               "unknown": dict(evidence.unknown)}
    if not evidence.ran_dense:
        step("densify", 1, 1)
        details["reason"] = f"every pruned layer ran sparse ({evidence.source}): nothing to give back"
        return StageResult("densify", "skipped", time.perf_counter() - t0, None, details)
    result = run_stage("densify", folder, "pruned", densify_config_record(weights, densify_config), force=force,
                       inputs=file_inputs(densify_config), sources=sources,
                       make=lambda: densify(engine_dir, densify_config, out=folder))
    step("densify", 1, 1)
    result.details = details
    return result


def sparse_use_check(first_engine: Path, rebuilt_engine: Path, first: dict[str, Any]) -> dict[str, Any]:
    """Did giving layers back change which OTHER layers run sparse? Compares the rebuilt engine's report
    with the first one's (`first`: the densify stage's details)."""
    from mpdeploy.densify.evidence import compare_sparse_use
    from mpdeploy.densify.stage import engine_evidence
    from mpdeploy.core.kinds import EngineFolder

    engine = EngineFolder.open(rebuilt_engine)
    try:
        after = engine_evidence(engine, engine.weights())
    except MpdeployError as exc:  # the rebuilt report says less than the first: the build stands, the check says why
        logger.warning("cannot check which layers the rebuilt engine ran sparse: %s", exc)
        return {"unchanged": None, "error": str(exc), "rebuilt_engine": str(rebuilt_engine)}
    check = compare_sparse_use(first.get("ran_sparse") or [], after)
    check.update(first_engine=str(first_engine), rebuilt_engine=str(rebuilt_engine))
    if not check["unchanged"]:
        logger.warning("densify changed which other layers run sparse: no longer sparse %s, newly sparse %s",
                       check["no_longer_sparse"] or "none", check["newly_sparse"] or "none")
    return check

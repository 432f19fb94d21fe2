"""The densify stage under the one reuse rule (`mpdeploy.core.runner`); `mpdeploy build` runs it from here."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.runner import StageResult, run_stage, step_progress

logger = logging.getLogger(__name__)


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
    from mpdeploy.core.kinds import EngineFolder
    from mpdeploy.densify.evidence import compare_sparse_use
    from mpdeploy.densify.stage import engine_evidence

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

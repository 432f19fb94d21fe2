"""The audit stage under the one reuse rule (`mpdeploy.core.runner`); `mpdeploy build` runs it from here."""

from __future__ import annotations

from pathlib import Path

from mpdeploy.core import atomic
from mpdeploy.core.runner import StageResult, run_stage, step_progress


def audit_stage(engine_dir: Path, audit_config, runtime, force: bool, progress) -> StageResult:
    """Audit `engine_dir` into `audit/` beside it; reused when engine, weights and config are the same."""
    from mpdeploy.audit.config import reuse_config
    from mpdeploy.audit.stage import audit
    from mpdeploy.audit.stage import audit_inputs, audit_sources
    from mpdeploy.core.kinds import AuditFolder, EngineFolder

    engine = EngineFolder.open(engine_dir)
    root, sources = Path(engine_dir).parent, audit_sources(engine)
    step = step_progress(progress, "audit")

    def make() -> None:
        step("audit", 0, 1)
        audit(root, audit_config, progress=step, runtime=runtime)

    result = run_stage("audit", root / "audit", "audit", reuse_config(audit_config), make, force=force,
                       inputs=audit_inputs(engine), sources=sources)
    step("audit", 1, 1)
    data = atomic.read_json(result.path / AuditFolder.RESULT, what="audit")
    result.details = {"passed": data.get("passed"), "failures": data.get("failures") or [],
                      "summary": data.get("summary") or {}}
    return result

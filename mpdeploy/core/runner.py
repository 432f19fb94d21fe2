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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts, atomic

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
    atomic.clean_stale_temps(folder)
    key = artifacts.config_hash(config)
    if not force and artifacts.is_complete(folder, kind, key, inputs or {}, sources):
        logger.info("%s: reusing %s (same config and inputs)", name, folder)
        status = "reused"
    else:
        make()
        status = "built"
    return StageResult(name, status, time.perf_counter() - t0, folder)

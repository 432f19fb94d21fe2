"""run_sweep: validate every trial, start (or attach to) Ray, probe the store, run the phases, write `sweep/`.

    <out>/steps/   the trials' artifacts, one folder per step (store.py), shared between trials
    <out>/tune/    Ray Tune's experiment folders (its own logs and state)
    <out>/sweep/   the sweep artifact (report.py)

With --promote K: a screen phase (prune [+ distill] and the pruned weights' accuracy, every trial), then
the whole chain for the K best only (choice.promote), per GPU kind. Without it: the whole chain for every
trial, per GPU kind.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError
from mpdeploy.pipeline.sweep import choice as choosing
from mpdeploy.pipeline.sweep.cluster import check_kinds, probe_store, ray_session, threads_per_trial
from mpdeploy.pipeline.sweep.report import FOLDER, write_sweep
from mpdeploy.pipeline.sweep.space import Objective, expand, trial_configs, trial_id
from mpdeploy.pipeline.sweep.store import STEPS
from mpdeploy.pipeline.sweep.trial import KIND_KEY, SweepPlan, config_record
from mpdeploy.pipeline.sweep.tune_run import DEFAULT_SAMPLES, TUNE_DIR, TuneSettings, run_phase

logger = logging.getLogger(__name__)

Progress = Callable[..., None]
MAX_VALIDATED = 4096  # trials checked one by one before any work; larger (Optuna) spaces: per key only


@dataclass(frozen=True)
class SweepRequest:
    grid: dict[str, list[str]]
    objective: Objective
    max_drop: float  # absolute top-1 drop, as a fraction (as `mpdeploy audit --max-top1-drop`)
    promote: int | None = None
    ray_address: str | None = None
    gpu_kinds: tuple[str, ...] = ()
    search: str = "grid"  # grid | optuna
    samples: int | None = None  # optuna: number of trials
    search_seed: int = 0  # optuna: the sampler's seed
    concurrent: int | None = None  # trials at once (default: one per core)
    retries: int = 2
    num_cpus: int | None = None  # a local Ray's cores (default: all)

    def __post_init__(self) -> None:
        if self.promote is not None and self.promote < 1:
            raise MpdeployError(f"--promote must be at least 1, not {self.promote}")
        if self.search not in ("grid", "optuna"):
            raise MpdeployError(f"--search is grid or optuna, not {self.search!r}")
        if self.search == "optuna" and self.promote is not None:
            raise MpdeployError("--promote screens a grid; with --search optuna, Optuna picks the trials: drop one")
        if not 0.0 <= self.max_drop <= 1.0:
            raise MpdeployError(f"--max-top1-drop is a fraction in [0, 1] (0.01 = 1 point), not {self.max_drop}")
        if self.samples is not None and self.samples < 1:
            raise MpdeployError(f"--samples must be at least 1, not {self.samples}")
        if self.samples is not None and self.search != "optuna":
            raise MpdeployError("--samples counts Optuna's trials; add --search optuna (a grid runs every combination)")
        if self.retries < 0:
            raise MpdeployError(f"--retries must be 0 or more, not {self.retries}")


@dataclass
class SweepResult:
    folder: Path
    rows: list[dict[str, Any]]
    choice: dict[str, str | None]
    seconds: float


def check_out(root: Path) -> None:
    """--out holds our folders only: refuse a user's folder before any work (nothing is deleted)."""
    if root.exists() and not root.is_dir():
        raise MpdeployError(f"--out {root} is a file; pass a folder")
    if root.is_dir():
        foreign = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in (STEPS, TUNE_DIR, FOLDER)]
        if foreign:
            raise MpdeployError(f"--out {root} holds files mpdeploy did not write ({', '.join(sorted(foreign)[:3])}); "
                                "nothing was changed: choose a new or empty folder, or the --out of an earlier sweep")


def validate(plan: SweepPlan, request: SweepRequest) -> list[dict[str, str]]:
    """Every trial's configs made (each flag checked) before Ray starts: a bad combination is one line now."""
    trials = expand(request.grid) if request.search == "grid" else []
    if request.search == "optuna" and _size(request.grid) <= MAX_VALIDATED:
        trials = expand(request.grid)
    for values in trials[:MAX_VALIDATED]:
        try:
            trial_configs(values, plan.prune, plan.distill, plan.export, plan.build, plan.backend)
        except MpdeployError as exc:
            raise MpdeployError(f"trial {' '.join(f'{k}={v}' for k, v in values.items())}: {exc}") from None
    if request.search == "grid" and len(trials) > MAX_VALIDATED:
        raise MpdeployError(f"--grid makes {len(trials)} trials; use --search optuna --samples N for a space this large")
    return trials


def _size(grid: Mapping[str, Sequence[str]]) -> int:
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def run_sweep(plan: SweepPlan, request: SweepRequest, progress: Progress | None = None) -> SweepResult:
    t0 = time.perf_counter()
    root = plan.store.root
    check_out(root)
    if request.gpu_kinds and plan.backend == "auto":
        raise MpdeployError("--gpu-kinds needs a named --backend (trt, torch or ort): each kind builds its own engines")
    trials = validate(plan, request)
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with ray_session(request.ray_address, request.num_cpus) as cluster:
        nodes = probe_store(root)
        if request.gpu_kinds:
            check_kinds(request.gpu_kinds)
        threads, concurrent = threads_per_trial(cluster["cpus"] // (2 if request.gpu_kinds else 1) or 1,
                                                request.concurrent)
        plan = dataclasses.replace(plan, threads=threads, build=dataclasses.replace(plan.build, threads=threads))
        settings = TuneSettings(concurrent=concurrent, retries=request.retries, search=request.search,
                                samples=request.samples or DEFAULT_SAMPLES, seed=request.search_seed)
        planned = (f"{settings.samples} Optuna-sampled trials (seed {settings.seed}) from a space of "
                   f"{_size(request.grid)}" if request.search == "optuna" else f"{len(trials)} trials")
        logger.info("sweep: %s on %d Ray node(s), %d at once, %d thread(s) each", planned, len(nodes), concurrent,
                    threads)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        rows = _phases(plan, request, trials, settings, stamp, progress)
    baselines = choosing.baseline_rows(rows, request.objective)
    rows = rows + baselines
    choice = choosing.choose(rows, request.objective, request.max_drop)
    front = choosing.pareto_front(rows, request.objective)
    seconds = round(time.perf_counter() - t0, 2)
    info = {"model": plan.spec.source, "backend": plan.backend, "backend_reason": plan.backend_reason,
            "grid": request.grid, "search": request.search, "promote": request.promote,
            **({"optuna": {"samples": settings.samples, "seed": settings.seed}} if request.search == "optuna" else {}),
            "gpu_kinds": list(request.gpu_kinds), "ray": {"address": request.ray_address or "local",
                                                           "nodes": len(nodes), "cpus": cluster["cpus"]},
            "threads_per_trial": plan.threads, "concurrent_trials": settings.concurrent, "seconds": seconds,
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    folder = write_sweep(root, rows, choice, front, request.objective, request.max_drop,
                         {**config_record(plan), "grid": request.grid, "max_top1_drop": request.max_drop,
                          "promote": request.promote, "search": request.search, "gpu_kinds": list(request.gpu_kinds),
                          **({"optuna": info["optuna"]} if "optuna" in info else {})},
                         info)
    for kind, chosen in choice.items():
        logger.info("sweep choice on %s: %s", kind, chosen or "none (no trial met the constraint)")
    return SweepResult(folder, rows, choice, seconds)


def _phases(plan: SweepPlan, request: SweepRequest, trials: list[dict[str, str]], settings: TuneSettings, stamp: str,
            progress: Progress | None) -> list[dict[str, Any]]:
    kinds: Sequence[str | None] = request.gpu_kinds or (None,)
    space: Any = request.grid
    rows: list[dict[str, Any]] = []
    if request.promote is not None:
        screened = run_phase(plan, "screen", request.grid, settings, f"screen-{stamp}", request.max_drop, progress)
        promoted, why = choosing.promote(screened, request.promote, request.max_drop)
        logger.info("promoted %d of %d screened trials: %s", len(promoted), len(screened), ", ".join(promoted))
        for r in screened:
            if r["id"] in why:
                rows += [{**r, "status": "not promoted", "reason": why[r["id"]], "kind": kind} for kind in kinds]
            elif r.get("status") == "failed":
                rows += [{**r, "kind": kind} for kind in kinds]
        space = [r["config"] for r in screened if r["id"] in promoted]
        if not space:
            return rows
    for kind in kinds:
        phase_settings = dataclasses.replace(settings, kind=kind)
        rows += run_phase(plan, "full", space, phase_settings, f"full-{kind or 'cpu'}-{stamp}", request.max_drop,
                          progress)
    order = {trial_id(t): i for i, t in enumerate(trials)}
    rows.sort(key=lambda r: (r.get("kind") or "", order.get(trial_id({k: v for k, v in r["config"].items()
                                                                     if k != KIND_KEY}), len(order))))
    return rows

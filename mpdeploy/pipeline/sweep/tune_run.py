"""Ray Tune runs the trials: the grid (tune.grid_search) or an Optuna search (OptunaSearch, for spaces too large
to grid), each trial with its placement-group resources, retried by Tune (FailureConfig) when its worker dies.

Tune's own experiment folder lives under `<out>/tune/`; the rows come back through `tune.report` and every
number in them was read from a verified artifact. A re-run does not restore Tune's pickled results: it runs
the trials again, and every step that verifies is reused (nothing is recomputed), so what the sweep reports
is always what the artifacts on disk say.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.pipeline.sweep.cluster import trial_bundles
from mpdeploy.pipeline.sweep.space import Objective, describe, trial_id
from mpdeploy.pipeline.sweep.trial import KIND_KEY, SweepPlan, run_trial

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
DEFAULT_SAMPLES = 16  # --search optuna without --samples
Progress = Callable[..., None]


@dataclass(frozen=True)
class TuneSettings:
    concurrent: int  # trials at once
    retries: int = 2  # Tune's FailureConfig(max_failures): a trial whose worker died is run again
    search: str = "grid"  # "grid" | "optuna"
    samples: int | None = None  # optuna: how many trials (DEFAULT_SAMPLES)
    kind: str | None = None  # the GPU kind the trials' engine steps ask for (one Tune run per kind)
    seed: int = 0  # optuna: its sampler's seed (the same samples every run)


def _trainable(config: dict[str, Any], plan: SweepPlan, phase: str) -> None:
    from ray import tune

    values = dict(config.get("trial") or config)
    row = run_trial(values, plan, phase)
    tune.report({"row": json.dumps(row), "ok": row["status"] == "ok", **_search_metrics(row, plan.objective)})


def _search_metrics(row: dict[str, Any], objective: Objective) -> dict[str, float | None]:
    """What Optuna optimizes: the objective (of the sparse engine, or -top1 in the screen) and the top-1 drop."""
    drop = row.get("top1_drop")
    value = None
    if row.get("phase") == "full":
        stats = ((row.get("latency") or {}).get(str(objective.batch)) or {}).get("sparse") or {}
        value = objective.of(stats)
    return {"objective": value, "top1_drop": drop if isinstance(drop, (int, float)) else None}


class _TrialLog:
    """One log line per finished trial, with the best so far; forwards to the CLI's bar."""

    def __init__(self, total: int | None, objective: Objective, max_drop: float, progress: Progress | None,
                 phase: str) -> None:
        from ray.tune import Callback

        log = self

        class TrialLog(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                log.finished(json.loads(result["row"]))

            def on_trial_error(self, iteration, trials, trial, **info):
                log.errored(trial)

        self.callback = TrialLog()
        self.total, self.objective, self.max_drop, self.progress, self.phase = total, objective, max_drop, progress, phase
        self.done, self.best = 0, None

    def _better(self, row: dict[str, Any]) -> bool:
        drop = row.get("top1_drop")
        if row.get("status") != "ok" or not isinstance(drop, (int, float)) or drop > self.max_drop:
            return False
        value = _search_metrics(row, self.objective)["objective"]
        if self.phase == "screen":
            return self.best is None or drop < self.best[1]
        return value is not None and (self.best is None or self.objective.better(value, self.best[1]))

    def finished(self, row: dict[str, Any]) -> None:
        self.done += 1
        value = _search_metrics(row, self.objective)["objective"] if self.phase == "full" else row.get("top1_drop")
        if self._better(row):
            self.best = (row["id"], value)
        what = (f"{row['status']}" + (f" ({row['reason']})" if row.get("reason") else "")
                + (f", top-1 drop {row['top1_drop']:.2%}" if isinstance(row.get("top1_drop"), float) else "")
                + (f", {self.objective.label} {value:.4g} {self.objective.unit}"
                   if self.phase == "full" and isinstance(value, float) else ""))
        best = "none yet" if self.best is None else f"{self.best[0]}"
        logger.info("%s trial %d/%s %s [%s]: %s; best so far: %s", self.phase, self.done, self.total or "?",
                    row["id"], describe(row["config"]), what, best)
        if self.progress:
            self.progress(f"{self.phase} trials", self.done, self.total or self.done, best=best)

    def errored(self, trial) -> None:
        self.done += 1
        logger.info("%s trial %d/%s %s failed after its retries: %s", self.phase, self.done, self.total or "?",
                    trial.trial_id, _error_line(getattr(trial, "error_file", None)))
        if self.progress:
            self.progress(f"{self.phase} trials", self.done, self.total or self.done)


def _error_line(error: Any) -> str:
    text = str(error or "").strip()
    if text and Path(text).is_file():
        text = Path(text).read_text(errors="replace").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "the trial's worker failed")[:300]


def optuna_search(space: dict[str, Sequence[str]], kinds: dict[str, str], objective: Objective, phase: str,
                  seed: int):
    """(param_space, OptunaSearch) of an Optuna-searched phase: every grid key a categorical choice, the
    objective and the top-1 drop minimised together (multi-objective TPE, seeded: the same samples every run)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    # Optuna logs every study it creates on its own handler; the sweep reports through logging only.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    class Search(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # A failed trial reports no numbers: tell Optuna it failed (it learns nothing from it) rather than
            # hand it None values, which it refuses with a warning on stderr.
            if result is not None and any(result.get(m) is None for m in self.metric):
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    param_space = {**{k: tune.choice(list(v)) for k, v in space.items()}, **kinds}
    metric, mode = (["top1_drop"], ["min"]) if phase == "screen" else (
        ["objective", "top1_drop"], [objective.mode, "min"])
    return param_space, Search(metric=metric, mode=mode, seed=seed)


def distinct_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (trial, kind): Optuna may sample a config twice (the second run reuses every step); the row
    records how many Tune trials ran it (`tune_trials`)."""
    seen: dict[tuple[str, str | None], dict[str, Any]] = {}
    for row in rows:
        key = (row["id"], row.get("kind"))
        if key in seen:
            first = seen[key]
            first["tune_trials"] += 1
            if first.get("status") != "ok" and row.get("status") == "ok":  # keep the run that finished
                seen[key] = {**row, "tune_trials": first["tune_trials"]}
        else:
            seen[key] = {**row, "tune_trials": 1}
    return list(seen.values())


def run_phase(plan: SweepPlan, phase: str, space: dict[str, Sequence[str]] | list[dict[str, str]],
              settings: TuneSettings, name: str, max_drop: float, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run one phase ("screen" or "full") of a sweep with Tune; returns a row per trial (failed ones too)."""
    from ray import tune

    # Tune's newer console output prints a boxed header and paths on stdout even at verbose=0; the sweep
    # reports through logging (and the CLI's bar) only.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(_trainable, plan=plan, phase=phase),
                                    tune.PlacementGroupFactory(trial_bundles(plan.threads, settings.kind),
                                                               strategy="PACK"))
    kinds = {KIND_KEY: settings.kind} if settings.kind else {}
    search_alg, samples = None, 1
    if isinstance(space, list):  # chosen trials (after the screen): a grid over exactly these
        param_space = {"trial": tune.grid_search([{**t, **kinds} for t in space])}
        total = len(space)
    elif settings.search == "optuna":
        param_space, search_alg = optuna_search(space, kinds, plan.objective, phase, settings.seed)
        samples = total = settings.samples or DEFAULT_SAMPLES
    else:
        param_space = {**{k: tune.grid_search(list(v)) for k, v in space.items()}, **kinds}
        total = 1
        for v in space.values():
            total *= len(v)
    log = _TrialLog(total, plan.objective, max_drop, progress, phase)
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        # Reused actors: a trial's worker process imports torch, timm and the stages once and runs the next
        # trial of the phase (every trial of a phase asks for the same resources); threads are set per trial.
        tune_config=tune.TuneConfig(num_samples=samples, search_alg=search_alg,
                                    max_concurrent_trials=settings.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(plan.store.root.resolve() / TUNE_DIR),
                                  failure_config=tune.FailureConfig(max_failures=settings.retries), verbose=0,
                                  callbacks=[log.callback], log_to_file=True))
    results = tuner.fit()
    rows = []
    for result in results:
        metrics = result.metrics or {}
        if "row" in metrics:
            rows.append(json.loads(metrics["row"]))
            continue
        values = dict((result.config or {}).get("trial") or result.config or {})
        rows.append({"id": trial_id(values), "config": values, "phase": phase, "status": "failed",
                     "kind": values.get(KIND_KEY), "backend": plan.backend,
                     "reason": f"the trial's worker failed {settings.retries + 1} time(s): {_error_line(result.error)}"})
    distinct = distinct_rows(rows)
    if len(distinct) < len(rows):
        logger.info("%s: %d Tune trials ran %d distinct configs (Optuna sampled some twice; the repeats reused "
                    "every step)", phase, len(rows), len(distinct))
    return distinct

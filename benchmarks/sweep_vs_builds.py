"""An 8-trial `mpdeploy sweep` of the embedded ViT against the same 8 configs run one after another with
`mpdeploy build`, and the same sweep with `--promote 2`: wall time of each, and their ratios.

Run: nice -n 5 .venv/bin/python benchmarks/sweep_vs_builds.py [--rounds 2] [--note TEXT] [--smoke]
  ->  benchmarks/results/sweep_vs_builds.json and docs/sweep_frontier.png (the sweep's frontier.png)

Goals (issue 26): sweep <= 0.6x the builds, --promote 2 <= 0.35x, on 2 cores. Every run is a fresh
subprocess into a fresh folder (nothing reused between runs), with the same flags. The machine may be
shared, so the three are timed back to back in rounds whose order reverses (builds, sweep, promote, then
promote, sweep, builds: a load that drifts over the rounds weighs on each about equally), the load average
is recorded around every run, and so is each run's CPU time summed over every process it started (Ray's
workers are not its children: os.wait4 cannot see them, so the processes that carry a tag in their
environment are sampled from /proc). The ratios are of the mean wall times over the rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sweep_vs_builds.json"
FIGURE = REPO / "docs" / "sweep_frontier.png"
MODEL = "zoo:digits_vit"
# 8 trials: 2 budgets x 2 saliencies x 2 MAC targets; the builds get the same flags one trial at a time.
GRID = {"budget": ["mp", "uniform"], "saliency": ["magnitude", "wanda"], "target-mac-reduction": ["0.3", "0.45"]}
COMMON = ["--backend", "ort", "--calib", "digits", "--calib-batches", "4", "--batch-sizes", "1,8",
          "--max-eval-images", "300", "--no-sensitivity", "--time-budget", "20", "--max-top1-drop", "0.02"]
BUILD_ONLY = ["--sparse", "--no-densify"]
SWEEP_ONLY = ["--objective", "p50@b8"]
GOALS = {"sweep": 0.6, "promote_2": 0.35}
TAG = "MPDEPLOY_BENCH_RUN"  # in the environment of a run: every process it starts (Ray's too) inherits it


class TaggedCPU:
    """CPU seconds of every process whose environment holds TAG=value, sampled from /proc while a run lasts."""

    def __init__(self, value: str, period_s: float = 0.25):
        self.needle = f"{TAG}={value}".encode()
        self.period_s = period_s
        self.last: dict[tuple[str, str], float] = {}  # (pid, start time) -> utime + stime so far
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if self.needle not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone, or not ours to read
                continue
            self.last[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / self.tick

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> "TaggedCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return round(sum(self.last.values()), 1)


def run(argv: list[str], log: Path, label: str) -> dict:
    tag = f"{os.getpid()}-{label}"
    env = {**os.environ, TAG: tag}
    with TaggedCPU(tag) as cpu, open(log, "w") as f:
        child = provenance.run_child([sys.executable, "-m", "mpdeploy", *argv], stdout=f, cwd=str(REPO), env=env)
    record = child.record()
    if record.get("returncode") not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:3])} failed ({record.get('returncode')}); see {log}")
    # cpu_s (os.wait4) is the child and what it waited for; Ray's workers are not among them
    return {**record, "cpu_s_all_processes": cpu.cpu_s, "processes_sampled": len(cpu.last)}


def build_runs(trials: list[dict[str, str]], work: Path, label: str) -> dict:
    runs = []
    for i, trial in enumerate(trials):
        extra = [x for k, v in trial.items() for x in (f"--{k}", v)]
        runs.append({"trial": trial, **run(["build", MODEL, "--out", str(work / f"{label}-{i}"), *COMMON,
                                            *BUILD_ONLY, *extra], work / f"{label}-{i}.log", f"{label}-{i}")})
    return {"runs": runs, "wall_s": round(sum(r["wall_s"] for r in runs), 2),
            "cpu_s_all_processes": round(sum(r["cpu_s_all_processes"] for r in runs), 1),
            "loadavg_before": runs[0]["loadavg_before"], "loadavg_after": runs[-1]["loadavg_after"]}


def sweep_run(grid: dict[str, list[str]], work: Path, label: str, promote: int | None) -> tuple[dict, Path]:
    grid_args = ["--grid", *(f"{k}={','.join(v)}" for k, v in grid.items())]
    extra = ["--promote", str(promote)] if promote else []
    out = work / label
    record = run(["sweep", MODEL, "--out", str(out), *COMMON, *SWEEP_ONLY, *extra, *grid_args], work / f"{label}.log",
                 label)
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    return {**record, "choice": sweep["choice"], "threads_per_trial": sweep.get("threads_per_trial"),
            "concurrent_trials": sweep.get("concurrent_trials"),
            "engines_built": sum(1 for r in sweep["rows"] if r.get("phase") == "full" and not r.get("baseline")),
            "failed": sum(1 for r in sweep["rows"] if r.get("status") == "failed")}, out


def choice_record(sweep: dict) -> dict:
    """The choice of a sweep and the numbers behind it (from its sweep.json)."""
    rows = {r["id"]: r for r in sweep["rows"]}
    chosen = rows.get(sweep["choice"].get("cpu"))
    if chosen is None:
        return {"id": None}
    b8 = (chosen.get("latency") or {}).get("8") or {}
    return {"id": chosen["id"], "config": chosen.get("config"), "verdict": chosen.get("verdict"),
            "top1_sparse": chosen.get("top1_sparse"), "top1_dense": chosen.get("top1_dense"),
            "top1_drop": chosen.get("top1_drop"), "mac_cut": chosen.get("mac_cut"),
            "p50_b8_ms": ((b8.get("sparse") or {}).get("p50")), "speedup_b8": b8.get("speedup"),
            "speedup_b8_ci95": b8.get("speedup_ci95")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 trials, 1 round, result under /tmp")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (builds, sweep, promote), order reversing")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = {"saliency": ["magnitude", "wanda"]} if args.smoke else GRID
    rounds = 1 if args.smoke else args.rounds
    results_path = args.out or (Path(tempfile.gettempdir()) / "sweep_vs_builds.smoke.json" if args.smoke else RESULTS)
    prov = provenance.begin(__file__, sys.argv[1:])
    prov.zoo("digits_vit")
    work = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    trials = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    order = ["builds", "sweep", "promote_2"]
    measured: dict[str, list[dict]] = {name: [] for name in order}
    folders: dict[str, Path] = {}  # the last sweep and promote run's --out
    try:
        for i in range(rounds):
            for position, name in enumerate(order if i % 2 == 0 else order[::-1], 1):
                label = f"{name}-r{i + 1}"
                print(f"round {i + 1}/{rounds}: {name} (load {provenance.loadavg()[0]})", flush=True)
                if name == "builds":
                    result = build_runs(trials, work, label)
                else:
                    result, folders[name] = sweep_run(grid, work, label, 2 if name == "promote_2" else None)
                measured[name].append({"round": i + 1, "position_in_round": position, **result})
                print(f"  {result['wall_s']:.1f} s wall, {result['cpu_s_all_processes']:.1f} CPU s", flush=True)
        record = json.loads((folders["sweep"] / "sweep" / "sweep.json").read_text())
        promoted = json.loads((folders["promote_2"] / "sweep" / "sweep.json").read_text())
        frontier = folders["sweep"] / "sweep" / "frontier.png"
        figure = FIGURE.relative_to(REPO).as_posix() if not args.smoke and frontier.is_file() else None
        mean = {name: statistics.mean(m["wall_s"] for m in runs) for name, runs in measured.items()}
        mean_cpu = {name: statistics.mean(m["cpu_s_all_processes"] for m in runs) for name, runs in measured.items()}
        results = {
            "model": MODEL, "trials": len(trials), "grid": grid, "flags": COMMON, "build_flags": BUILD_ONLY,
            "sweep_flags": SWEEP_ONLY, "rounds": rounds, "order": "round 1: builds, sweep, promote_2; each next "
            "round reversed (back to back, so each sees about the same load drift)", "runs": measured,
            "builds_wall_s": round(mean["builds"], 2), "sweep_wall_s": round(mean["sweep"], 2),
            "promote2_wall_s": round(mean["promote_2"], 2),
            "ratio_sweep_over_builds": round(mean["sweep"] / mean["builds"], 3),
            "ratio_promote2_over_builds": round(mean["promote_2"] / mean["builds"], 3),
            "ratio_per_round": [{"sweep": round(s["wall_s"] / b["wall_s"], 3), "promote_2": round(p["wall_s"] / b["wall_s"], 3)}
                                for b, s, p in zip(measured["builds"], measured["sweep"], measured["promote_2"])],
            "cpu_s_all_processes": {k: round(v, 1) for k, v in mean_cpu.items()},
            "cpu_ratio_sweep_over_builds": round(mean_cpu["sweep"] / mean_cpu["builds"], 3),
            "cpu_ratio_promote2_over_builds": round(mean_cpu["promote_2"] / mean_cpu["builds"], 3),
            "goals": GOALS,
            "met": {"sweep": mean["sweep"] / mean["builds"] <= GOALS["sweep"],
                    "promote_2": mean["promote_2"] / mean["builds"] <= GOALS["promote_2"]},
            "sweep_choice": choice_record(record), "promote2_choice": choice_record(promoted),
            "sweep_threads_per_trial": record.get("threads_per_trial"),
            "sweep_concurrent_trials": record.get("concurrent_trials"), "figure": figure,
            "note": " ".join(x for x in (args.note, "Timed with nice -n 5." if os.nice(0) >= 5 else "") if x),
        }
        provenance.write_results(results_path, results, prov)
        if figure:  # after the results: the provenance's end state is the tree the run started from
            shutil.copyfile(frontier, FIGURE)
        print(json.dumps({k: results[k] for k in ("builds_wall_s", "sweep_wall_s", "promote2_wall_s",
                                                  "ratio_sweep_over_builds", "ratio_promote2_over_builds",
                                                  "ratio_per_round", "cpu_s_all_processes")}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

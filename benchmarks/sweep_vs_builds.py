"""An 8-trial `mpdeploy sweep` of the embedded ViT against the same 8 configs run one after another with
`mpdeploy build`, and the same sweep with `--promote 2`: wall time of each, and their ratios.

Run: .venv/bin/python benchmarks/sweep_vs_builds.py [--smoke]
  ->  benchmarks/results/sweep_vs_builds.json (and docs/sweep_frontier.png: the sweep's frontier.png)

Goals (issue 26): sweep <= 0.6x the builds, --promote 2 <= 0.35x, on 2 cores. Every run is a fresh
subprocess into a fresh folder (nothing reused between the three), with the same flags; the machine
is shared, so the load average is recorded around each run (provenance.run_child).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sweep_vs_builds.json"
FIGURE = REPO / "docs" / "sweep_frontier.png"
MODEL = "zoo:digits_vit"
# 8 trials: 2 budgets x 2 saliencies x 2 MAC targets; the builds get the same flags one trial at a time.
GRID = {"budget": ["mp", "uniform"], "saliency": ["magnitude", "wanda"], "target-mac-reduction": ["0.3", "0.45"]}
COMMON = ["--backend", "ort", "--calib", "digits", "--calib-batches", "4", "--batch-sizes", "1,8",
          "--max-eval-images", "300", "--no-sensitivity", "--time-budget", "20"]
BUILD_ONLY = ["--sparse", "--no-densify"]
SWEEP_ONLY = ["--max-top1-drop", "0.02", "--objective", "p50@b8"]


def flag(key: str) -> str:
    return f"--{key}"


def run(argv: list[str], log: Path, prov) -> dict:
    with open(log, "w") as f:
        child = provenance.run_child([sys.executable, "-m", "mpdeploy", *argv], stdout=f, cwd=str(REPO))
    record = child.record()
    if record.get("returncode") not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:3])} failed ({record.get('returncode')}); see {log}")
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 trials, tiny eval set, result under /tmp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = {"saliency": ["magnitude", "wanda"]} if args.smoke else GRID
    results_path = args.out or (Path(tempfile.gettempdir()) / "sweep_vs_builds.smoke.json" if args.smoke else RESULTS)
    prov = provenance.begin(__file__, sys.argv[1:])
    prov.zoo("digits_vit")
    work = Path(tempfile.mkdtemp(prefix="sweep_bench_"))
    trials = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    try:
        builds = []
        for i, trial in enumerate(trials):
            extra = [x for k, v in trial.items() for x in (flag(k), v)]
            builds.append({"trial": trial, **run(["build", MODEL, "--out", str(work / f"build{i}"), *COMMON,
                                                  *BUILD_ONLY, *extra], work / f"build{i}.log", prov)})
        grid_args = ["--grid", *(f"{k}={','.join(v)}" for k, v in grid.items())]
        sweep = run(["sweep", MODEL, "--out", str(work / "sweep"), *COMMON, *SWEEP_ONLY, *grid_args],
                    work / "sweep.log", prov)
        promote = run(["sweep", MODEL, "--out", str(work / "promote"), *COMMON, *SWEEP_ONLY, "--promote", "2",
                       *grid_args], work / "promote.log", prov)
        record = json.loads((work / "sweep" / "sweep" / "sweep.json").read_text())
        builds_wall = sum(b["wall_s"] for b in builds)
        results = {
            "model": MODEL, "trials": len(trials), "grid": grid, "flags": COMMON,
            "builds": builds, "builds_wall_s": round(builds_wall, 2),
            "sweep": sweep, "promote_2": promote,
            "ratio_sweep_over_builds": round(sweep["wall_s"] / builds_wall, 3),
            "ratio_promote2_over_builds": round(promote["wall_s"] / builds_wall, 3),
            "goals": {"sweep": 0.6, "promote_2": 0.35},
            "sweep_choice": record["choice"], "sweep_threads_per_trial": record.get("threads_per_trial"),
            "sweep_concurrent_trials": record.get("concurrent_trials"),
        }
        if not args.smoke and (work / "sweep" / "sweep" / "frontier.png").is_file():
            shutil.copyfile(work / "sweep" / "sweep" / "frontier.png", FIGURE)
        provenance.write_results(results_path, results, prov)
        print(json.dumps({k: results[k] for k in ("builds_wall_s", "ratio_sweep_over_builds",
                                                  "ratio_promote2_over_builds")}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end `mpdeploy build timm:MODEL --sparse --backend ort` with the default audit: wall and CPU time.

Run: .venv/bin/python benchmarks/build_e2e.py [--models resnet50,vit_base_patch16_224] [--smoke]
  ->  benchmarks/results/build_e2e.json (--smoke: a tiny model at 32x32, result under /tmp unless --out)
With --models, the builds of other models already in the result file stay, each with the provenance of
the run that measured it (the file's own provenance is the latest run's).

Goal (issue 17): at most 5 minutes per model on the 2-core machine. Each build runs in a fresh
subprocess (random init: no weights download here); CPU seconds and peak RSS are that child's own
(provenance.run_child: os.wait4's rusage of the one build, not a running maximum), the load
average is sampled before and after: wall time on a shared
machine is inflated by whatever else runs, CPU seconds much less so. The build's stderr (its log)
is kept to count the progress lines a non-terminal run prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "build_e2e.json"
MODELS = ("resnet50", "vit_base_patch16_224")
GOAL_S = 300.0


def run_build(model: str, out: Path, extra: list[str], timeout_s: float, prov: provenance.Provenance) -> dict:
    """One build in a subprocess; wall, CPU, load and the audit's own timings."""
    argv = [sys.executable, "-m", "mpdeploy", "build", f"timm:{model}", "--sparse", "--backend", "ort",
            "--weights", "random", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "w") as log:
        run = provenance.run_child(argv, timeout_s=timeout_s, stdout=log, env=env, cwd=out.parent)
    prov.model(f"timm:{model}", provenance.build_model_sha256(out))
    text = log_path.read_text(errors="replace")
    record = {"model": model, "command": " ".join(["mpdeploy", *argv[3:]]), **run.record(),
              "within_goal_wall": run.wall_s <= GOAL_S,
              "progress_lines": sum("ETA" in line or "done in" in line for line in text.splitlines()),
              "log_tail": text.splitlines()[-6:]}
    audit_json = out / "audit" / "audit.json"
    if audit_json.is_file():
        audit = json.loads(audit_json.read_text())
        record["audit"] = {
            "passed": audit["passed"], "seconds": audit["seconds"], "steps_s": audit.get("timings"),
            "latency": {b: {"ratio_p50": v["ratio_p50"], "interval": v.get("ratio_interval"),
                            "rounds": v["ratio_spread"]["rounds"], "stopped": v.get("stopped"),
                            "timing_seconds": v.get("timing_seconds"),
                            "dense_p50_ms": v["dense"]["p50"], "sparse_p50_ms": v["sparse"]["p50"]}
                        for b, v in audit["latency"].items()},
            "sensitivity": audit.get("sensitivity_summary") and {
                k: audit["sensitivity_summary"].get(k) for k in ("layers_pruned", "layers_measured", "stopped", "seconds")},
            "eval_images": audit["summary"]["eval_images"],
        }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma list; other models' builds already in --out are kept, each with its run's provenance")
    parser.add_argument("--smoke", action="store_true", help="timm:test_resnet at 32x32, batch sizes 1,4 (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/build_e2e.json, "
                                                               "or a temporary file with --smoke)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per build, seconds")
    parser.add_argument("--note", default="2-core machine shared with other jobs: wall time is inflated by them, "
                        "see the load averages", help="what else ran on the machine (goes into the JSON)")
    args = parser.parse_args(argv)
    models = ["test_resnet"] if args.smoke else args.models.split(",")
    extra = ["--input-shape", "3,32,32", "--batch-sizes", "1,4"] if args.smoke else []
    out_json = args.out or (Path(tempfile.mkdtemp(prefix="build_e2e_")) / "build_e2e.json" if args.smoke else RESULTS)
    prov = provenance.begin(__file__, argv)
    results = {"note": args.note,
               "command": "python benchmarks/build_e2e.py " + ("--smoke" if args.smoke else f"--models {','.join(models)}"),
               "goal_s_per_model": GOAL_S, "builds": []}
    if out_json.is_file() and not args.smoke:  # one model per run fits a time box: keep the others' rows
        old = json.loads(out_json.read_text())
        results["builds"] = [{"provenance": b.get("provenance", old.get("provenance")), **b}
                             for b in old.get("builds", []) if b["model"] not in models]
    with tempfile.TemporaryDirectory(prefix="build_e2e_") as tmp:
        for model in models:
            record = run_build(model, Path(tmp) / model, extra, args.timeout, prov)
            results["builds"].append(record)
            print(json.dumps({k: record[k] for k in ("model", "returncode", "wall_s", "cpu_s")}), flush=True)
            provenance.write_results(out_json, results, prov)  # after every build: a partial run keeps its rows
    print(f"wrote {out_json}")
    return 0 if all(r["returncode"] == 0 or r["returncode"] == 1 for r in results["builds"]) else 1


if __name__ == "__main__":
    sys.exit(main())

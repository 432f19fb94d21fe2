"""End to end `mpdeploy build timm:MODEL --sparse --backend ort` with the default audit: wall and CPU time.

Run: .venv/bin/python benchmarks/build_e2e.py [--models resnet50,vit_base_patch16_224] [--smoke]
  ->  benchmarks/results/build_e2e.json (--smoke: a tiny model at 32x32, result under /tmp unless --out)

Goal (issue 17): at most 5 minutes per model on the 2-core machine. Each build runs in a fresh
subprocess (random init: no weights download here); CPU seconds and peak RSS are the child's
(resource.RUSAGE_CHILDREN), the load average is sampled before and after: wall time on a shared
machine is inflated by whatever else runs, CPU seconds much less so. The build's stderr (its log)
is kept to count the progress lines a non-terminal run prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "build_e2e.json"
MODELS = ("resnet50", "vit_base_patch16_224")
GOAL_S = 300.0


def machine() -> dict:
    from mpdeploy.machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shared": "2-core machine shared with other jobs at the time: wall time is inflated, see loadavg"}


def _children_usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 1024.0


def run_build(model: str, out: Path, extra: list[str], timeout_s: float) -> dict:
    """One build in a subprocess; wall, CPU, load and the audit's own timings."""
    argv = [sys.executable, "-m", "mpdeploy", "build", f"timm:{model}", "--sparse", "--backend", "ort",
            "--weights", "random", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    log_path = out.parent / f"{out.name}.log"
    cpu0, _ = _children_usage()
    load0 = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=out.parent)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    cpu1, peak = _children_usage()
    text = log_path.read_text(errors="replace")
    record = {"model": model, "command": " ".join(["mpdeploy", *argv[3:]]), "returncode": rc,
              "wall_s": round(wall, 1), "cpu_s": round(cpu1 - cpu0, 1), "peak_rss_mib_any_child": round(peak),
              "loadavg_before": load0, "loadavg_after": [round(v, 2) for v in os.getloadavg()],
              "within_goal_wall": wall <= GOAL_S,
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
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--smoke", action="store_true", help="timm:test_resnet at 32x32, batch sizes 1,4 (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/build_e2e.json, "
                                                               "or a temporary file with --smoke)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per build, seconds")
    args = parser.parse_args(argv)
    models = ["test_resnet"] if args.smoke else args.models.split(",")
    extra = ["--input-shape", "3,32,32", "--batch-sizes", "1,4"] if args.smoke else []
    out_json = args.out or (Path(tempfile.mkdtemp(prefix="build_e2e_")) / "build_e2e.json" if args.smoke else RESULTS)
    import torch

    results = {"machine": {**machine(), "torch": torch.__version__},
               "command": "python benchmarks/build_e2e.py" + (" --smoke" if args.smoke else ""),
               "goal_s_per_model": GOAL_S, "builds": []}
    with tempfile.TemporaryDirectory(prefix="build_e2e_") as tmp:
        for model in models:
            record = run_build(model, Path(tmp) / model, extra, args.timeout)
            results["builds"].append(record)
            print(json.dumps({k: record[k] for k in ("model", "returncode", "wall_s", "cpu_s")}), flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0 if all(r["returncode"] == 0 or r["returncode"] == 1 for r in results["builds"]) else 1


if __name__ == "__main__":
    sys.exit(main())

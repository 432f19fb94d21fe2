"""Time and peak memory of `prune` (mp budget, magnitude saliency) on ViT-B/16 and ResNet50.

Run: .venv/bin/python benchmarks/prune_timing.py  ->  benchmarks/results/prune_timing.json
Each model runs in a fresh subprocess so peak RSS is its own. Random init (no weights download here).
`--smoke` prunes timm's test_vit once and writes to --out (the test suite runs it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("vit_base_patch16_224", "resnet50")
RESULTS = Path(__file__).parent / "results" / "prune_timing.json"

CHILD = r"""
import json, resource, sys, time, tempfile
t0 = time.perf_counter()
import torch
torch.manual_seed(0)
from mpdeploy.models import ModelSpec, load_model
from mpdeploy.prune import PruneConfig, prune
shape = tuple(int(v) for v in sys.argv[2].split(",")) if len(sys.argv) > 2 else None
loaded = load_model(ModelSpec("timm:" + sys.argv[1], weights="random", input_shape=shape))
t_load = time.perf_counter()
steps, last = {}, [time.perf_counter()]
def progress(step, done, total):
    now = time.perf_counter()
    steps[step] = steps.get(step, 0.0) + now - last[0]
    last[0] = now
with tempfile.TemporaryDirectory() as tmp:
    prune(loaded, PruneConfig(budget="mp", saliency="magnitude"), __import__("pathlib").Path(tmp) / "pruned", progress=progress)
    t_end = time.perf_counter()
steps["count_macs+assign+write"] = t_end - last[0]
print(json.dumps({"import_and_load_s": t_load - t0, "prune_s": t_end - t_load, "steps_s": steps,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_threads": torch.get_num_threads()}))
"""


def machine() -> dict:
    from mpdeploy.machine import cpu_model

    cpu = cpu_model()
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "loadavg_1m_at_start": round(load[0], 2)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="timm test_vit at 3x32x32 only (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = {"test_vit": "3,32,32"} if args.smoke else {name: None for name in MODELS}

    results = {"machine": {**machine(), "torch": torch.__version__},
               "command": "python benchmarks/prune_timing.py",
               "config": {"budget": "mp", "saliency": "magnitude", "pattern": "2:4"},
               "goal_s": {"vit_base_patch16_224": 60, "resnet50": 30},
               "steps_note": "steps_s: wall time between consecutive progress reports, charged to the step that "
                             "reported; 'fit' includes the two MAC-counting forward passes that run before the MP "
                             "fits; the last entry is MAC assignment, compliance checks and writing the artifact",
               "models": {}}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    for name, shape in models.items():
        out = subprocess.run([sys.executable, "-c", CHILD, name, *([shape] if shape else [])], capture_output=True,
                             text=True, check=True, env=env)
        results["models"][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results["models"][name])
    results["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

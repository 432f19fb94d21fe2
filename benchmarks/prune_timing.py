"""Time and peak memory of `prune` (mp budget, magnitude saliency) on ViT-B/16 and ResNet50.

Run: .venv/bin/python benchmarks/prune_timing.py  ->  benchmarks/results/prune_timing.json
Each model runs in a fresh subprocess (provenance.run_child) so peak RSS is its own.
Random init (no weights download here).
`--smoke` prunes timm's test_vit once and writes to --out (the test suite runs it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import provenance

MODELS = ("vit_base_patch16_224", "resnet50")
RESULTS = Path(__file__).parent / "results" / "prune_timing.json"

CHILD = r"""
import json, sys, time, tempfile
t0 = time.perf_counter()
import torch
torch.manual_seed(0)
from mpdeploy.models.load import load_model
from mpdeploy.models.spec import ModelSpec
from mpdeploy.prune.stage import PruneConfig, prune
shape = tuple(int(v) for v in sys.argv[2].split(",")) if len(sys.argv) > 2 else None
loaded = load_model(ModelSpec("timm:" + sys.argv[1], weights="random", input_shape=shape))
from provenance import state_dict_sha256
model_sha256 = state_dict_sha256(loaded.module)
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
                  "torch_threads": torch.get_num_threads(), "model_sha256": model_sha256}))
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="timm test_vit at 3x32x32 only (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = {"test_vit": "3,32,32"} if args.smoke else {name: None for name in MODELS}

    prov = provenance.begin(__file__, argv)
    results = {"command": "python benchmarks/prune_timing.py",
               "config": {"budget": "mp", "saliency": "magnitude", "pattern": "2:4"},
               "goal_s": {"vit_base_patch16_224": 60, "resnet50": 30},
               "steps_note": "steps_s: wall time between consecutive progress reports, charged to the step that "
                             "reported; 'fit' includes the two MAC-counting forward passes that run before the MP "
                             "fits; the last entry is MAC assignment, compliance checks and writing the artifact",
               "models": {}}
    here = Path(__file__).resolve().parent
    path = [str(here.parent), str(here), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    for name, shape in models.items():
        run = provenance.run_child([sys.executable, "-c", CHILD, name, *([shape] if shape else [])], env=env)
        if run.returncode != 0:
            raise SystemExit(f"prune of {name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
        record = json.loads(run.stdout.strip().splitlines()[-1])
        prov.model(f"timm:{name}", record.pop("model_sha256"), "sha256 of the random-init state dict (seed 0)")
        results["models"][name] = {**record, **run.record()}
        print(name, results["models"][name])
    provenance.write_results(args.out, results, prov)


if __name__ == "__main__":
    main()

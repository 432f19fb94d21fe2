"""Wall and CPU seconds per phase of the default prune with restore, before and after the shared Hessian.

    python benchmarks/prune_speed.py [--before REF] [--models resnet50,vit_base_patch16_224] [--threads 0,1]
        [--smoke] -> benchmarks/results/prune_speed.json

What runs is `mpdeploy prune timm:NAME --restore --calib synthetic` with the default saliency (`auto`) and
budget (`mp`): `mpdeploy.prune.stage.prune` on the timm model with random init (torch seed 0, no weights download),
writing the pruned/ artifact to a temporary folder. Each (code, model) runs in its own child process
(provenance.run_child: its own peak RSS and CPU seconds). `--before REF` also measures the code of git
ref REF (exported with `git archive` into a temporary folder, the checkout untouched) on the same models.
Phases are the progress reports of the prune stage: `fit` (the MAC counts and the Marchenko-Pastur fits),
`calibrate` (loading calibration data, the layer input statistics and covariances), `mask` (mask
selection per layer), `restore`, and `write` (MAC accounting, checks, the artifact). Goal (issue 26):
ResNet50 and ViT-B/16 at most 90 s each on an idle 2-core machine. The machine is shared: the load
average before and after every child is recorded beside its times; `--nice N` runs children at nice N.
`--threads 1` adds runs on one torch thread: their CPU seconds are the work itself, which a shared
machine does not inflate with a second thread's spin-waits (what 2 idle cores need at best is half of
it). Each run also records the held-out relative output error of the pruned layers (mean, max), from
the manifest's restore entries: the quality side of the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import provenance

MODELS = ("resnet50", "vit_base_patch16_224")
SMOKE = {"test_vit": "3,32,32"}
RESULTS = provenance.RESULTS / "prune_speed.json"

CHILD = r"""
import hashlib, json, sys, time, tempfile
from pathlib import Path
t0 = time.perf_counter()
import torch
torch.manual_seed(0)
from mpdeploy.models.load import load_model
from mpdeploy.models.spec import ModelSpec
from mpdeploy.prune.stage import PruneConfig, prune
name, shape, threads, calib_dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
shape = tuple(int(v) for v in shape.split(",")) if shape else None
if threads:
    torch.set_num_threads(threads)
loaded = load_model(ModelSpec("timm:" + name, weights="random", input_shape=shape))
digest = hashlib.sha256()
state = loaded.module.state_dict()
for key in sorted(state):
    tensor = state[key].detach().cpu().contiguous()
    digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
phases, last = {}, [time.perf_counter(), time.process_time()]
def progress(step, done, total):
    wall, cpu = time.perf_counter(), time.process_time()
    entry = phases.setdefault(step, {"wall_s": 0.0, "cpu_s": 0.0})
    entry["wall_s"] += wall - last[0]
    entry["cpu_s"] += cpu - last[1]
    last[:] = [wall, cpu]
extra = {} if calib_dtype == "auto" else {"calib_dtype": calib_dtype}  # code before --calib-dtype: auto only
config = PruneConfig(saliency="auto", calib="synthetic", restore=True, **extra)
t_load, c_load = time.perf_counter(), time.process_time()
last[:] = [t_load, c_load]
with tempfile.TemporaryDirectory() as tmp:
    prune(loaded, config, Path(tmp) / "pruned", progress=progress)
    manifest = json.loads((Path(tmp) / "pruned" / "manifest.json").read_text())
t_end, c_end = time.perf_counter(), time.process_time()
phases["write"] = {"wall_s": t_end - last[0], "cpu_s": c_end - last[1]}
chosen = [r["saliency_chosen"] for r in manifest["layers"] if r.get("saliency_chosen")]
restore = [r["restore"] for r in manifest["layers"] if r.get("restore")]
errors = [r["error_after"] for r in restore if r.get("error_after") is not None]
print(json.dumps({
    "state_dict_sha256": digest.hexdigest(), "import_and_load_s": round(t_load - t0, 2),
    "prune_wall_s": round(t_end - t_load, 2), "prune_cpu_s": round(c_end - c_load, 2),
    "phases": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in phases.items()},
    "torch_threads": torch.get_num_threads(), "saliency": config.saliency, "budget": config.budget,
    "pruned_layers": manifest["totals"]["pruned_layers"],
    "sparse_execution_mac_reduction": round(manifest["totals"]["sparse_execution_mac_reduction"], 4),
    "auto_choices": {c: chosen.count(c) for c in sorted(set(chosen))},
    "restore_improved_layers": sum(1 for r in restore if r.get("improved")),
    "restore_scheme": sorted({r.get("scheme", "sequential") for r in restore}),
    "held_out_layer_error": {"layers": len(errors), "mean": round(sum(errors) / max(1, len(errors)), 6),
                             "max": round(max(errors, default=0.0), 6)},
    "calibration": manifest.get("calibration"),
}))
"""


def export_ref(ref: str, into: Path) -> str:
    """The tree of git ref `ref` written under `into` (git archive: the checkout is not touched); its commit."""
    commit = subprocess.run(["git", "-C", str(provenance.REPO), "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(provenance.REPO), "archive", "-o", str(archive), commit, "mpdeploy"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return commit


def run_one(code_root: Path, name: str, shape: str, timeout_s: float, nice: int, threads: int = 0,
            calib_dtype: str = "auto") -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-c", CHILD, name, shape, str(threads), calib_dtype]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    run = provenance.run_child(argv, timeout_s=timeout_s, env=env, cwd=str(code_root))
    record = run.record()
    if run.returncode == 0:
        record.update(json.loads(run.stdout.strip().splitlines()[-1]))
    else:
        record["error"] = (run.stderr.strip().splitlines() or ["(no output)"])[-1][-300:]
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="timm names (random init)")
    parser.add_argument("--before", default=None, help="git ref of the code to compare against (e.g. HEAD)")
    parser.add_argument("--skip-after", action="store_true", help="with --before: measure only the old code")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child before it is killed")
    parser.add_argument("--nice", type=int, default=0, help="run each child at this nice level (negative needs root)")
    parser.add_argument("--threads", default="0",
                        help="torch intra-op threads of each child, comma-separated to run each model once per "
                             "count (0: torch's default, one per core: the runs labelled after / before; N: "
                             "after_threadsN). 1 measures the work itself: on a shared machine a second OpenMP "
                             "thread's spin-waits add CPU seconds that do no work")
    parser.add_argument("--calib-dtypes", default="auto",
                        help="the working tree's --calib-dtype per run, comma-separated (auto: labelled as above; "
                             "float32 / bfloat16: after_float32 / after_bfloat16, torch's default threads)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--smoke", action="store_true", help="timm's test_vit at 3x32x32 only (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = SMOKE if args.smoke else {name: "" for name in args.models.split(",")}
    prov = provenance.begin(__file__, argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    results = {"command": "mpdeploy prune timm:NAME --restore --calib synthetic (saliency auto, budget mp)",
               "goal_s": {"resnet50": 90, "vit_base_patch16_224": 90}, "note": args.note, "nice": args.nice,
               "runs": {}}
    with tempfile.TemporaryDirectory(prefix="prune_speed_") as tmp:
        codes = {} if args.skip_after and args.before else {"after": (provenance.REPO, "working tree")}
        if args.before:
            commit = export_ref(args.before, Path(tmp))
            codes["before"] = (Path(tmp), f"git {args.before} = {commit}")
        for name, shape in models.items():
            for (label, (root, what)), threads in ((c, t) for c in codes.items() for t in thread_counts):
                record = run_one(root, name, shape, args.timeout, args.nice, threads)
                record["code"] = what
                label = f"{label}_threads{threads}" if threads else label  # torch's default: plain "after"
                results["runs"].setdefault(name, {})[label] = record
                if "state_dict_sha256" in record:
                    prov.model(f"timm:{name}" + (f"@{shape}" if shape else ""), record["state_dict_sha256"],
                               "sha256 of the state dict: timm random init, torch.manual_seed(0)")
                _report(name, label, record)
            for calib_dtype in (d for d in args.calib_dtypes.split(",") if d != "auto"):
                record = run_one(provenance.REPO, name, shape, args.timeout, args.nice, 0, calib_dtype)
                record["code"] = f"working tree, --calib-dtype {calib_dtype}"
                results["runs"].setdefault(name, {})[f"after_{calib_dtype}"] = record
                _report(name, f"after_{calib_dtype}", record)
    provenance.write_results(args.out, results, prov)


def _report(name: str, label: str, record: dict) -> None:
    print(name, label, json.dumps({k: record.get(k) for k in ("returncode", "wall_s", "cpu_s", "peak_rss_mib", "phases",
                                                              "loadavg_before", "held_out_layer_error")}), flush=True)


if __name__ == "__main__":
    main()

"""`make demo`'s build, measured: the README's demo paragraph comes from this script's results.

Run: .venv/bin/python benchmarks/demo.py [--smoke]  ->  benchmarks/results/demo.json

Runs exactly the demo's command, `mpdeploy build --sparse` (the embedded default: zoo:digits_vit,
`--calib digits --distill-epochs 3`), in a temporary working folder, as one child process measured
by provenance.run_child (wall, CPU seconds, its own peak RSS), then reads the figures from the
build's own artifacts: the prune manifest (sparse-execution MAC reduction, the saliency `auto` chose
per layer), the distilled manifest (top-1 dense / pruned / distilled on the digits test split), the
export's ONNX Runtime check (max |ORT - PyTorch|) and audit.json (verdict, dense/sparse p50 ratio per
batch size). `--smoke` adds `--distill-epochs 1 --no-plots --max-eval-images 64` (seconds, for the test).
`--cpu-isa avx2` holds torch's kernels to AVX2 in the child (ATEN_CPU_CAPABILITY, oneDNN's
ONEDNN_MAX_CPU_ISA, MKL's MKL_ENABLE_INSTRUCTIONS), as on a CPU without AVX-512: the same demo on another
kind of CPU, written to demo_avx2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import provenance

RESULTS = provenance.RESULTS / "demo.json"
# Environment that holds torch's CPU kernels to one instruction set (each library reads its own variable).
CPU_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
COMMAND = ["build", "--sparse"]
SMOKE_EXTRA = ["--distill-epochs", "1", "--no-plots", "--max-eval-images", "64"]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def figures(build: Path) -> dict:
    """The demo's figures, from the build folder's own manifests and audit."""
    pruned = read(build / "pruned" / "manifest.json")
    distilled = read(build / "distilled" / "manifest.json")
    onnx = read(build / "onnx" / "manifest.json")
    audit = read(build / "audit" / "audit.json")
    totals = pruned.get("totals") or pruned["summary"]
    chosen = Counter(layer["saliency_chosen"] for layer in pruned["layers"]
                     if layer.get("pattern") and layer.get("saliency_chosen"))
    record = distilled.get("distill", distilled)
    ratios = {b: v["ratio_p50"] for b, v in audit["latency"].items()}
    return {
        "model": pruned["model"]["name"],
        "sparse_execution_mac_reduction": totals["sparse_execution_mac_reduction"],
        "pruned_layers": totals.get("pruned_layers"),
        "saliency_chosen": dict(chosen),
        "top1_dense": record["top1_teacher"], "top1_pruned": record["top1_before"],
        "top1_distilled": record["top1_after"], "top1_split": record.get("top1_split"),
        "ort_vs_pytorch_max_abs_diff": onnx["ort_check"]["max_abs_diff_sparse"],
        "audit_passed": audit["passed"],
        "ort_speed_ratio": {"batches": [int(b) if str(b).isdigit() else b for b in ratios],
                            "min": min(ratios.values()), "max": max(ratios.values()), "per_batch": ratios},
    }


def _capability(env: dict) -> str:
    """The instruction set torch's kernels use under `env` (torch.backends.cpu.get_cpu_capability in a child)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return proc.stdout.strip() or f"unknown: {proc.stderr.strip()[-200:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 distillation epoch, 64 audit images, no plots")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-isa", choices=sorted(CPU_ISA_ENV), default=None,
                        help="hold torch's kernels to this instruction set (default: what the CPU has)")
    args = parser.parse_args(argv)
    default = RESULTS.with_name(f"demo_{args.cpu_isa}.json") if args.cpu_isa else RESULTS
    out = args.out or (Path(tempfile.mkdtemp(prefix="demo_")) / "demo.json" if args.smoke else default)
    prov = provenance.begin(__file__, argv)
    prov.zoo("digits_vit")
    mpdeploy = [sys.executable, "-m", "mpdeploy"]
    path = (str(provenance.REPO), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **CPU_ISA_ENV.get(args.cpu_isa, {})}
    with tempfile.TemporaryDirectory(prefix="demo_build_") as tmp:
        argv_build = [*mpdeploy, *COMMAND, *(SMOKE_EXTRA if args.smoke else [])]
        run = provenance.run_child(argv_build, env=env, cwd=tmp)
        build = Path(tmp) / "engines" / "digits_vit"
        if run.returncode not in (0, 1) or not (build / "audit" / "audit.json").is_file():
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        result = {"command": "mpdeploy " + " ".join(argv_build[len(mpdeploy):]), **run.record(),
                  "cpu_isa_env": CPU_ISA_ENV.get(args.cpu_isa), "cpu_capability": _capability(env),
                  **figures(build), "summary_table": run.stdout.strip().splitlines()[-20:]}
    provenance.write_results(out, result, prov)
    print(json.dumps({k: v for k, v in result.items() if k != "summary_table"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""INT8 (Q/DQ) vs FP32 on ONNX Runtime's CPU provider, on the zoo's digits models, in one run.

For each model (zoo:digits_vit, zoo:digits_cnn): prune 2:4 (`mp` budget, magnitude saliency, digits
calibration), export with `--precision int8` (ONNX Runtime quantize_static, QDQ, symmetric per-channel
weights, activations calibrated on 128 digits calibration images) and `--precision fp16`, then
- top-1 on the 539-image digits test split of the FP32, FP16 and INT8 files (sparse and dense twin);
- latency: ORT CPU sessions (ORT_ENABLE_ALL, fixed threads), warm-up, then interleaved rounds
  (fp32, int8, fp16, fp32, ...) per batch size; p50 / p90 in ms, with the process CPU seconds.
The CPU's VNNI / AMX flags from /proc/cpuinfo are recorded: ONNX Runtime's INT8 GEMMs use VNNI
(avx512_vnni / avx_vnni) or AMX (amx_int8) where present.

    python benchmarks/int8_ort.py [--smoke] [--threads 1] [--reps 30]

Writes benchmarks/results/int8_ort.json (or int8_ort.smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return {f: f in flags for f in CPU_FLAGS}


def machine(threads: int) -> dict:
    import onnxruntime as ort
    import torch

    from mpdeploy.core.machine import cpu_model

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(), "cpu_cores_visible": os.cpu_count(), "intra_op_num_threads": threads,
        "cpu_flags": flags, "vnni": bool(flags.get("avx512_vnni") or flags.get("avx_vnni")),
        "amx": bool(flags.get("amx_int8")), "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
    }


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def top1(sess, x: np.ndarray, y: np.ndarray) -> float:
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == y).mean() * 100)


def latency(sessions: dict, x: np.ndarray, reps: int) -> dict:
    """Interleaved rounds; wall p50/p90 and, since the shared machine inflates wall time, the mean
    process CPU time per call (one intra-op thread: CPU time is the work done)."""
    times = {k: [] for k in sessions}
    cpu = {k: 0.0 for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"input": x})
    for _ in range(reps):
        for name, s in sessions.items():
            c0, t0 = time.process_time(), time.perf_counter()
            s.run(None, {"input": x})
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name] += time.process_time() - c0
    out = {k: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)),
               "min_ms": float(np.min(v)), "cpu_ms_mean": cpu[k] / reps * 1e3} for k, v in times.items()}
    for k in sessions:
        if k != "fp32":
            out[f"speedup_{k}_vs_fp32_p50"] = out["fp32"]["p50_ms"] / out[k]["p50_ms"]
            out[f"speedup_{k}_vs_fp32_cpu"] = out["fp32"]["cpu_ms_mean"] / out[k]["cpu_ms_mean"]
            out[f"speedup_{k}_vs_fp32_min"] = out["fp32"]["min_ms"] / out[k]["min_ms"]
    return out


def run_model(name: str, work: Path, threads: int, reps: int, batches: list[int]) -> dict:
    import torch

    from mpdeploy.models.data import digits_tensors
    from mpdeploy.export.stage import ExportConfig, export
    from mpdeploy.prune.stage import PruneConfig, prune
    from mpdeploy.models.zoo import load_zoo_model

    loaded = load_zoo_model(name)
    pruned = work / name / "pruned"
    t0 = time.perf_counter()
    prune(loaded, PruneConfig(pattern="2:4", calib="digits"), pruned)
    files = {}
    for precision in ("int8", "fp16"):
        out = export(pruned, ExportConfig(precision=precision), work / name / f"onnx-{precision}")
        record = json.loads((out / "sparsity.json").read_text())
        files[precision] = (out, record)
    prep_seconds = time.perf_counter() - t0
    onnx_dir, record = files["int8"]
    x, y = digits_tensors(tuple(loaded.input_shape), "test")
    x = x.numpy().astype(np.float32)
    y = y.numpy()
    result: dict = {"input_shape": list(loaded.input_shape), "test_images": int(len(y)),
                    "prepare_seconds_wall": prep_seconds,
                    "int8_calibration": record["precision"]["calibration"],
                    "int8_eligible_2_4": record["precision"]["eligible_2_4"],
                    "graph_findings_warnings": record["precision"]["graph_findings"]["warnings"], "top1": {}}
    for variant, base in (("sparse", "model"), ("dense", "model.dense")):
        paths = {"fp32": onnx_dir / f"{base}.onnx", "int8": onnx_dir / f"{base}.int8.onnx",
                 "fp16": files["fp16"][0] / f"{base}.fp16.onnx"}
        sessions = {k: session(p, threads) for k, p in paths.items()}
        acc = {k: top1(s, x, y) for k, s in sessions.items()}
        acc["int8_drop_points"] = acc["fp32"] - acc["int8"]
        result["top1"][variant] = acc
        if variant == "sparse":
            result["latency"] = {}
            for b in batches:
                result["latency"][f"batch{b}"] = latency(sessions, x[:b].copy(), reps)
    del torch
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one model, few repetitions (a quick run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: benchmarks/results/int8_ort[.smoke].json)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    models = ["zoo:digits_cnn"] if args.smoke else ["zoo:digits_vit", "zoo:digits_cnn"]
    reps = 5 if args.smoke else args.reps
    batches = [1] if args.smoke else [1, 32]
    prov = provenance.begin(__file__)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = {"machine": machine(args.threads), "smoke": args.smoke, "reps": reps, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            results["models"][model] = run_model(model.split(":", 1)[1], Path(tmp), args.threads, reps, batches)
            prov.zoo(model.split(":", 1)[1])
    results["wall_seconds"] = time.perf_counter() - wall0
    results["cpu_seconds"] = time.process_time() - cpu0
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"]["loadavg_end"] = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    target = args.out or RESULTS / ("int8_ort.smoke.json" if args.smoke else "int8_ort.json")
    provenance.write_results(target, results, prov)
    print(json.dumps({m: {"top1": r["top1"], "latency": r.get("latency")} for m, r in results["models"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

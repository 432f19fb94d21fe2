"""ONNX Runtime CPU latency of ViT-B/16 dense vs Token Merging (r=8, r=13), in one run.

Random-init `vit_base_patch16_224` (latency does not depend on the weights' values; ToMe's
matching does, but its cost is fixed by r). Each variant is exported to ONNX (temp dir) with a
dynamic batch axis, checked against PyTorch, warmed up, then timed with interleaved repetitions
(dense, r8, r13, dense, r8, r13, ...) so drift in machine load hits all variants alike.

    python benchmarks/tome_ort_latency.py [--threads 2] [--reps 30 --reps-large 10]

Writes benchmarks/results/tome_ort_latency.json: per variant and batch size the median / p90 /
min latency, the measured speedup over dense, the MAC ratio (mpdeploy.sparsity.tome.tome_mac_ratio) and
fraction_of_mac_ratio = measured_speedup / (1 / mac_ratio) (1.0 = latency fell as much as MACs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpdeploy.sparsity.tome import apply_tome, tome_mac_ratio, tome_token_counts  # noqa: E402
from mpdeploy.core.machine import cpu_model  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

logger = logging.getLogger("tome_ort_latency")
RESULTS = Path(__file__).resolve().parent / "results" / "tome_ort_latency.json"


def machine_info(threads: int) -> dict:
    cpu = cpu_model()
    return {
        "cpu_model": cpu,
        "cpu_cores_visible": os.cpu_count(),
        "intra_op_num_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def export(model: torch.nn.Module, path: Path, exporter: str) -> None:
    x = torch.randn(1, 3, 224, 224)
    kwargs = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    if exporter == "dynamo":
        # dynamic_shapes, not dynamic_axes: the dynamo exporter deprecates the latter
        del kwargs["dynamic_axes"]
        batch = torch.export.Dim("batch", min=1)
        kwargs.update(dynamo=True, external_data=False, verbose=False, dynamic_shapes=({0: batch},))
    else:
        kwargs.update(dynamo=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter from timm's shape asserts
        torch.onnx.export(model, (x,), str(path), **kwargs)


def stats(times_s: list[float]) -> dict:
    t = np.asarray(times_s) * 1e3
    return {
        "median_ms": round(float(np.median(t)), 3),
        "p90_ms": round(float(np.percentile(t, 90)), 3),
        "min_ms": round(float(t.min()), 3),
        "mean_ms": round(float(t.mean()), 3),
        "reps": int(t.size),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 13], help="ToMe r values to compare with dense")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra_op_num_threads")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per variant at batch 1")
    ap.add_argument("--reps-large", type=int, default=10, help="timed repetitions per variant at batch > 1")
    ap.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="vit_tiny, r=8, batch 1, two reps (a test runs it)")
    ap.add_argument("--note", default="interleaved repetitions so load drift hits every variant alike; the load "
                    "average is recorded", help="what else ran on the machine (goes into the JSON)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.r, args.batches, args.warmup, args.reps, args.reps_large = "vit_tiny_patch16_224", [8], [1], 1, 2, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    prov = provenance.begin(__file__, argv)
    torch.manual_seed(0)
    variants = [("dense", 0)] + [(f"tome_r{r}", r) for r in args.r]
    input_shape = (1, 3, 224, 224)
    sessions, meta = {}, {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    check = torch.randn(2, 3, 224, 224)

    with tempfile.TemporaryDirectory(prefix="tome_bench_") as tmp:
        for name, r in variants:
            torch.manual_seed(0)  # same weights for every variant
            model = timm.create_model(args.model, pretrained=False).eval()
            if not r:
                prov.module(f"timm:{args.model}", model, "sha256 of the random-init state dict (seed 0)")
            ratio = tome_mac_ratio(model, r, input_shape)
            counts = tome_token_counts(model, r)
            if r:
                apply_tome(model, r)  # dense stays the stock timm model
            path = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            export(model, path, args.exporter)
            export_s = time.perf_counter() - t0
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            with torch.no_grad():
                ref = model(check).numpy()
            err = float(np.abs(sess.run(None, {"x": check.numpy()})[0] - ref).max())
            sessions[name] = sess
            meta[name] = {"r": r, "mac_ratio": round(ratio, 4), "token_counts": counts,
                          "ort_vs_torch_max_abs_diff": err, "export_s": round(export_s, 1)}
            logger.info("%s: exported in %.1fs, MAC ratio %.4f, ORT vs torch max |diff| %.2e",
                        name, export_s, ratio, err)
            del model

        results = []
        load_before = loadavg()
        rng = np.random.default_rng(0)
        for batch in args.batches:
            x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
            reps = args.reps if batch == 1 else args.reps_large
            for name, _ in variants:
                for _ in range(args.warmup):
                    sessions[name].run(None, {"x": x})
            times = {name: [] for name, _ in variants}
            for _ in range(reps):  # interleaved: A B C A B C ...
                for name, _ in variants:
                    t0 = time.perf_counter()
                    sessions[name].run(None, {"x": x})
                    times[name].append(time.perf_counter() - t0)
            dense_median = float(np.median(times["dense"]))
            for name, r in variants:
                s = stats(times[name])
                speedup = dense_median / float(np.median(times[name]))
                ratio = meta[name]["mac_ratio"]
                row = {"variant": name, "r": r, "batch": batch, **s,
                       "images_per_s": round(batch / (s["median_ms"] / 1e3), 2),
                       "speedup_vs_dense": round(speedup, 4),
                       "mac_ratio": ratio,
                       "mac_speedup": round(1.0 / ratio, 4),
                       "fraction_of_mac_ratio": round(speedup * ratio, 4)}
                results.append(row)
                logger.info("batch %d %-9s median %8.2f ms  p90 %8.2f ms  speedup %.3fx  MAC ratio %.4f "
                            "(ideal %.3fx)  fraction %.3f", batch, name, s["median_ms"], s["p90_ms"],
                            speedup, ratio, 1.0 / ratio, speedup * ratio)
        load_after = loadavg()

    report = {
        "benchmark": "tome_ort_latency",
        "note": args.note,
        "model": args.model,
        "weights": "random init (timm pretrained=False, seed 0)",
        "exporter": args.exporter,
        "provider": "CPUExecutionProvider",
        "protocol": {"warmup": args.warmup, "reps_batch1": args.reps, "reps_larger_batches": args.reps_large,
                     "order": "interleaved per repetition: " + ", ".join(n for n, _ in variants)},
        "mac_counting": "mpdeploy.sparsity.tome.tome_macs: patch-embed conv, block Linear layers, attention "
                        "matmuls (2*N^2*C per block), ToMe matching/merge matmuls, head",
        "machine": machine_info(args.threads),
        "loadavg_before_after": [load_before, load_after],
        "variants": meta,
        "results": results,
        "goal": "fraction_of_mac_ratio >= 0.85",
    }
    report = provenance.write_results(args.out, report, prov)
    logger.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    main()

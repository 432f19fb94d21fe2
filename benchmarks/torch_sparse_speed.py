"""Dense vs 2:4 latency through mpdeploy's torch backend (torch.sparse semi-structured, fp16) on a CUDA GPU.

Random-init ViT-B/16 and ResNet50 (latency does not depend on weight values, only on the 2:4 pattern),
pruned with mpdeploy's prune stage (uniform 2:4 budget: every eligible layer), built and loaded with
`TorchSparseBackend` (dense twin + one sparse engine per kernel: cuSPARSELt and CUTLASS), timed with
CUDA events (input on the device once), warm-up first, then interleaved rounds (dense, sparse-a,
sparse-b, dense, ...) so clock drift hits all variants alike; medians and p10/p90 per batch size.

    python benchmarks/torch_sparse_speed.py                    # on a GPU machine: everything, one call
    python benchmarks/torch_sparse_speed.py --dry-run          # CPU: build + prune the models, list conversions

Writes benchmarks/results/torch_sparse_speed.json with the results and the machine: GPU, driver, CUDA,
torch, cuSPARSELt, timm, mpdeploy versions, plus what `python3 -c "import tensorrt"` and
`ldconfig -p | grep nvinfer` say (whether TensorRT is there for the trt backend). A dry run writes
nothing unless --out is given, and never any latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py, when loaded by file path
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

logger = logging.getLogger("torch_sparse_speed")
RESULTS = Path(__file__).resolve().parent / "results" / "torch_sparse_speed.json"
MODELS = {"vit_base_patch16_224": (3, 224, 224), "resnet50": (3, 224, 224)}


def shell(cmd: str) -> dict:
    """Run a shell probe and keep its exit status and (trimmed) output: a record, never a failure."""
    try:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        return {"cmd": cmd, "rc": out.returncode, "stdout": out.stdout[-4000:], "stderr": out.stderr[-4000:]}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"cmd": cmd, "rc": None, "error": f"{type(exc).__name__}: {exc}"}


def machine_info() -> dict:
    import timm
    import torch

    from mpdeploy import __version__
    from mpdeploy.core.machine import cpu_model
    from mpdeploy.backends.torch_sparse import TorchSparseBackend

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "timm": timm.__version__,
        "mpdeploy": __version__,
        "torch_backend": TorchSparseBackend().device_info(),
        "torch_backend_available": list(TorchSparseBackend.availability()),
        "probes": {
            "import_tensorrt": shell(f"{sys.executable} -c \"import tensorrt; print(tensorrt.__version__)\""),
            "python3_import_tensorrt": shell("python3 -c \"import tensorrt; print(tensorrt.__version__)\""),
            "ldconfig_nvinfer": shell("ldconfig -p | grep nvinfer"),
            "nvidia_smi": shell("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm "
                                "--format=csv,noheader"),
        },
    }
    info["torch_cuda_available"] = torch.cuda.is_available()
    return info


def prune_model(name: str, shape: tuple[int, ...] | None, out: Path) -> Path:
    """Random init (seeded), mpdeploy prune with the uniform 2:4 budget -> `out/pruned`."""
    import torch

    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.models.load import load_model
    from mpdeploy.prune.stage import PruneConfig, prune

    torch.manual_seed(0)
    loaded = load_model(ModelSpec(f"timm:{name}", weights="random", input_shape=shape))
    return prune(loaded, PruneConfig(budget="uniform"), out / "pruned")


def stats(ms: list[float]) -> dict:
    t = np.asarray(ms, dtype=np.float64)
    return {"median_ms": round(float(np.median(t)), 4), "p10_ms": round(float(np.percentile(t, 10)), 4),
            "p90_ms": round(float(np.percentile(t, 90)), 4), "min_ms": round(float(t.min()), 4), "n": int(t.size)}


def bench_model(name: str, shape, args, work: Path) -> dict:
    import torch

    from mpdeploy.backends.base import BuildConfig, BuildInputs
    from mpdeploy.backends.torch_sparse import TorchSparseBackend, plan_conversion
    from mpdeploy.sparsity.pruned import load_pruned

    pruned = prune_model(name, shape, work / name)
    art = load_pruned(pruned, "sparse")
    model, shape = art.model, art.input_shape
    plans = {k: plan_conversion(model, k, args.precision, args.conv1x1) for k in args.kernels}
    entry: dict = {
        "model_sha256": provenance.file_sha256(pruned / "dense.safetensors"),
        "input_shape": list(shape),
        "precision": args.precision,
        "conv1x1": args.conv1x1,
        "conversion": {k: {"converted": [e["name"] for e in p if e["convert"]],
                           "not_converted": {e["name"]: e["reason"] for e in p if not e["convert"]}}
                       for k, p in plans.items()},
    }
    for k, p in plans.items():
        logger.info("%s [%s]: %d of %d Linear/Conv layers would run 2:4", name, k, sum(e["convert"] for e in p), len(p))
    if args.dry_run:
        return entry

    backend = TorchSparseBackend()
    engines: dict[str, tuple[Path, BuildConfig]] = {}
    inputs = BuildInputs(onnx_dir=work / name / "onnx", pruned_dir=pruned)  # torch reads only pruned/
    for variant, kernel in [("dense", args.kernels[0])] + [("sparse", k) for k in args.kernels]:
        config = BuildConfig(precision=args.precision, batch_sizes=tuple(args.batches),
                             backend_options=(("kernel", kernel), ("conv1x1", args.conv1x1)))
        out = work / name / f"engine-{variant}-{kernel}"
        out.mkdir(parents=True, exist_ok=True)
        built = backend.build(inputs, variant, out, config)
        label = "dense" if variant == "dense" else f"sparse_{kernel}"
        engines[label] = (out / built.file, config)
        if variant == "sparse":
            entry.setdefault("build", {})[label] = {k: built.report[k] for k in
                                                    ("max_abs_diff_vs_unconverted", "channels_last", "load_convert_seconds")}
    entry["latency"] = {}
    runners = {label: backend.load(path, config) for label, (path, config) in engines.items()}
    try:
        for batch in args.batches:
            x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
            for runner in runners.values():
                runner.time(x, args.warmup)
            times: dict[str, list[float]] = {label: [] for label in runners}
            for _ in range(args.rounds):  # interleaved: drift and thermal state hit every variant alike
                for label, runner in runners.items():
                    times[label] += runner.time(x, args.calls)
            row = {label: stats(ms) for label, ms in times.items()}
            for label in row:
                if label != "dense":
                    row[label]["speedup_vs_dense"] = round(row["dense"]["median_ms"] / row[label]["median_ms"], 4)
            entry["latency"][str(batch)] = row
            logger.info("%s batch %d: %s", name, batch, {k: v["median_ms"] for k, v in row.items()})
    finally:
        for runner in runners.values():
            runner.close()
        torch.cuda.empty_cache()
    return entry


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of timm names (default: ViT-B/16, ResNet50)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--kernels", nargs="+", default=["cusparselt", "cutlass"], choices=["cusparselt", "cutlass"])
    ap.add_argument("--conv1x1", default="large", choices=["large", "all", "off"])
    ap.add_argument("--warmup", type=int, default=20, help="calls per engine and batch before timing")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per batch size")
    ap.add_argument("--calls", type=int, default=5, help="back-to-back timed calls per engine per round")
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: build, prune, list what would convert")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS}; none for --dry-run)")
    ap.add_argument("--smoke", action="store_true", help="--dry-run on timm's test_vit at 3x32x32 (a test runs it)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.dry_run = "test_vit", True
        MODELS.setdefault("test_vit", (3, 32, 32))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from mpdeploy.backends.torch_sparse import TorchSparseBackend

    ok, why = TorchSparseBackend.availability()
    if not ok and not args.dry_run:
        logger.error("torch sparse backend unavailable: %s (use --dry-run on a machine without an sm_80+ GPU)", why)
        raise SystemExit(2)

    names = [m for m in args.models.split(",") if m]
    prov = provenance.begin(__file__, argv)
    result = {"schema": "mpdeploy.bench.torch_sparse_speed/1", "dry_run": args.dry_run, "machine": machine_info(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="torch_sparse_bench_") as tmp:
        for name in names:
            result["models"][name] = bench_model(name, MODELS.get(name), args, Path(tmp))
            prov.model(f"timm:{name}", result["models"][name]["model_sha256"],
                       "sha256 of pruned/dense.safetensors (random init, seed 0)")
    out = args.out or (None if args.dry_run else RESULTS)
    if out is not None:
        result = provenance.write_results(out, result, prov)
        logger.info("wrote %s", out)
    else:
        print(json.dumps({n: {k: len(v["converted"]) for k, v in m["conversion"].items()}
                          for n, m in result["models"].items()}, indent=2))
    return result


if __name__ == "__main__":
    main()

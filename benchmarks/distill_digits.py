"""Benchmark: does a 3-epoch distillation bring 2:4-pruned digits models back to their dense accuracy?

For each zoo model (trained here on scikit-learn's digits, cached under engines/_zoo/): prune 2:4 with a
uniform magnitude budget, distill with the default DistillConfig (3 epochs), and measure top-1 on the
digits test split (539 images) for the dense, pruned and distilled model. Writes
benchmarks/results/distill_digits.json and .md. Goal: distilled within 1 point of dense.

    python benchmarks/distill_digits.py [--models digits_vit,digits_cnn] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpdeploy.core import artifacts, atomic  # noqa: E402
from mpdeploy.models.data import load_images  # noqa: E402
from mpdeploy.distill.config import DistillConfig, PAPER_LR  # noqa: E402
from mpdeploy.distill.datasets import evaluate  # noqa: E402
from mpdeploy.distill.stage import distill  # noqa: E402
from mpdeploy.prune.stage import PruneConfig, prune  # noqa: E402
from mpdeploy.sparsity.pruned import load_pruned  # noqa: E402
from mpdeploy.models.zoo import load_zoo_model, zoo_sha256  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

logger = logging.getLogger("distill_digits")


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def run_model(name: str, work: Path, epochs: int, lr: float | None, sweep: list[float]) -> dict:
    t0 = time.perf_counter()
    loaded = load_zoo_model(name)
    load_s = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = load_images("digits", loaded.input_shape, split="test")
    dense_top1 = evaluate(loaded.module.to(device), test, device)
    loaded.module.cpu()

    t0 = time.perf_counter()
    pruned_dir = prune(loaded, PruneConfig(pattern="2:4", budget="uniform", saliency="magnitude"), work / name / "pruned")
    prune_s = time.perf_counter() - t0
    pruned_top1 = evaluate(load_pruned(pruned_dir).model.to(device), test, device)

    t0 = time.perf_counter()
    out = distill(pruned_dir, DistillConfig(epochs=epochs, lr=lr), work / name / "distilled")
    distill_s = time.perf_counter() - t0
    manifest = artifacts.read_manifest(out, "pruned")
    record = manifest["distill"]
    distilled_top1 = record["top1_after"]
    totals = manifest["totals"]
    # The same run at other multiples of the paper's lr: what the default's scaling is based on.
    optimizer = record["config"]["resolved"]["optimizer"]
    lr_sweep = []
    for scale in sweep:
        swept_lr = PAPER_LR[optimizer] * scale
        t1 = time.perf_counter()
        swept = distill(pruned_dir, DistillConfig(epochs=epochs, lr=swept_lr), work / name / f"sweep-{scale:g}")
        r = artifacts.read_manifest(swept, "pruned", verify=False)["distill"]
        lr_sweep.append({"paper_lr_x": scale, "lr": swept_lr, "distilled_top1": round(r["top1_after"], 2),
                         "final_loss": round(r["epochs"][-1]["loss"], 4), "seconds": round(time.perf_counter() - t1, 1)})
    return {
        "model": name,
        "zoo_weights_sha256": zoo_sha256(name),
        "params": sum(p.numel() for p in loaded.module.parameters()),
        "pattern": "2:4",
        "budget": "uniform",
        "saliency": "magnitude",
        "pruned_layers": totals["pruned_layers"],
        "skipped_layers": totals["skipped_layers"],
        "mac_reduction": round(totals["mac_reduction"], 4),
        "dense_top1": round(dense_top1, 2),
        "pruned_top1": round(pruned_top1, 2),
        "distilled_top1": round(distilled_top1, 2),
        "distilled_vs_dense": round(distilled_top1 - dense_top1, 2),
        "within_1pt": distilled_top1 >= dense_top1 - 1.0,
        "test_images": len(test),
        "epochs": [{k: e[k] for k in ("epoch", "loss", "seconds", "images_per_s")} for e in record["epochs"]],
        "distill_settings": {k: record["config"]["resolved"][k]
                             for k in ("optimizer", "lr", "lr_rule", "batch_size", "weight_decay", "amp", "device")},
        "seconds": {"zoo_load_or_train": round(load_s, 1), "prune": round(prune_s, 1), "distill": round(distill_s, 1)},
        "lr_sweep": lr_sweep,
    }


def markdown(result: dict) -> str:
    lines = [
        "# distill_digits: 2:4 prune + 3-epoch distillation on the digits zoo models",
        "",
        f"`{result['command']}` on {result['machine']['processor']} ({result['machine']['cpu_count']} CPUs, "
        f"{result['machine']['torch_threads']} torch threads, {result['machine']['device']}), {result['created']}.",
        "Top-1 (%) on the digits test split (539 images; 1 image = 0.19 points).",
        "",
        "| model | params | dense | pruned 2:4 | distilled | vs dense | within 1 pt | optimizer, lr | distill time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        s = r["distill_settings"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['dense_top1']:.2f} | {r['pruned_top1']:.2f} | "
            f"{r['distilled_top1']:.2f} | {r['distilled_vs_dense']:+.2f} | {'yes' if r['within_1pt'] else 'no'} | "
            f"{s['optimizer']} {s['lr']:.3g} | {r['seconds']['distill']:.0f} s |"
        )
    lines += ["", "Per-epoch distillation loss:", ""]
    for r in result["results"]:
        losses = ", ".join(f"{e['loss']:.4f}" for e in r["epochs"])
        lines.append(f"- {r['model']}: {losses} (lr rule: {r['distill_settings']['lr_rule']})")
    if any(r["lr_sweep"] for r in result["results"]):
        lines += ["", "Same run, other learning rates (multiples of the paper's: AdamW 1e-5 for the ViT, SGD 1e-3 for "
                  "the CNN); distilled top-1 (lr):", "", "| model | " + " | ".join(
                      f"paper lr x{s['paper_lr_x']:g}" for s in result["results"][0]["lr_sweep"]) + " |",
                  "|---|" + "---|" * len(result["results"][0]["lr_sweep"])]
        for r in result["results"]:
            lines.append(f"| {r['model']} | " + " | ".join(f"{s['distilled_top1']:.2f} ({s['lr']:.3g})" for s in r["lr_sweep"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_vit,digits_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None, help="override the default lr (default: DistillConfig's)")
    parser.add_argument("--sweep", default="",
                        help="also distill at these multiples of the paper's lr, e.g. 1,10,30,300 (default: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="where the artifacts go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill_digits.json")
    parser.add_argument("--smoke", action="store_true", help="digits_cnn, one epoch, no sweep (a test runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.epochs, args.sweep = "digits_cnn", 1, ""  # the zoo model the test suite trains anyway
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    prov = provenance.begin(__file__, argv)
    result = {
        "benchmark": "distill_digits",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "goal": "distilled top-1 within 1 point of dense",
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="distill_digits-") as tmp:
        work = args.work or Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            r = run_model(name, work, args.epochs, args.lr, [float(v) for v in args.sweep.split(",") if v])
            logger.info("%s: dense %.2f, pruned %.2f, distilled %.2f", name, r["dense_top1"], r["pruned_top1"],
                        r["distilled_top1"])
            prov.zoo(name)
            result["results"].append({**r, "model_sha256": prov.models[f"zoo:{name}"]["sha256"]})
    result = provenance.write_results(args.out, result, prov)
    atomic.atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    return 0 if args.smoke or all(r["within_1pt"] for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

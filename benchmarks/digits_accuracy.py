"""Top-1 on the digits test split of the zoo models, dense vs N:M pruned, every pruning option.

    python benchmarks/digits_accuracy.py [--models digits_vit,digits_cnn] [--distill-epochs 3]

For each zoo model (trained here on the digits train split, seed 0; cached in engines/_zoo/) and
each row below, the model is pruned with `mpdeploy.prune.stage.prune` (seed 0, calibration = the digits
calibration split where a saliency or restore needs it), re-loaded from the written artifact and
evaluated in PyTorch on the 539-image digits test split (the split every stage uses). Rows:

- dense; 2:4 uniform with magnitude / wanda / block-cost saliency;
- 2:4 mp budget (default target = 90% of the largest reduction) with each saliency;
- (budgets at equal sparse-execution targets are in method_table.py: uniform 2:4 is already the
  largest sparse-execution cut, so "mp at uniform's reduction" no longer exists for 2:4);
- the best mp row + permutation, + restore, + distillation (cumulative, where the module exists);
- 8:16 and 6:12: uniform (magnitude), mp (best saliency), mp at uniform's MAC reduction.

Each row carries its MAC reduction (kept MACs vs the dense model), the share that runs sparse on 2:4
hardware, top-1 agreement with dense and the certified fraction (audit.py's certificate) and the
`mpdeploy prune` command that makes the same artifact. Writes benchmarks/results/digits_accuracy.json
and .md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpdeploy.audit.metrics import certified_mask  # noqa: E402
from mpdeploy.models.data import digits_tensors  # noqa: E402
from mpdeploy.core.errors import MpdeployError  # noqa: E402
from mpdeploy.sparsity.patterns import NM  # noqa: E402
from mpdeploy.prune.stage import PruneConfig, prune  # noqa: E402
from mpdeploy.sparsity.pruned import load_pruned  # noqa: E402
from mpdeploy.models.zoo import load_zoo_model  # noqa: E402
from mpdeploy.core.machine import cpu_model  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

logger = logging.getLogger("digits_accuracy")
RESULTS = Path(__file__).resolve().parent / "results"
SALIENCIES = ("magnitude", "wanda", "block-cost", "sparsegpt", "auto")
# The pattern mp may add to reach uniform's MAC reduction: half the density, still runs on 2:4 hardware
# for 1:4 (every group of 4 holds <= 2 nonzeros).
HARDER = {NM(2, 4): NM(1, 4), NM(8, 16): NM(4, 16), NM(6, 12): NM(3, 12)}


def machine_info() -> dict:
    cpu = cpu_model()
    return {"cpu_model": cpu, "cpu_cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def command(model: str, config: PruneConfig, out: str) -> str:
    """The `mpdeploy prune` command that makes the same artifact."""
    parts = [f"mpdeploy prune zoo:{model}", f"--pattern {config.pattern}", f"--budget {config.budget}",
             f"--saliency {config.saliency}"]
    if config.extra_patterns:
        parts.append("--extra-patterns " + ",".join(str(p) for p in config.extra_patterns))
    if config.calib:
        parts.append(f"--calib {config.calib}")
    if config.target_mac_reduction is not None:
        parts.append(f"--target-mac-reduction {config.target_mac_reduction}")
    if config.permute:
        parts.append("--permute")
    if config.restore:
        parts.append("--restore")
    parts.append(f"--out {out}")
    return " ".join(parts)


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).float().numpy()


def metrics(logits: np.ndarray, dense: np.ndarray, y: np.ndarray) -> dict:
    return {"top1": float((logits.argmax(1) == y).mean()),
            "agreement": float((logits.argmax(1) == dense.argmax(1)).mean()),
            "certified": float(certified_mask(dense, logits).mean())}


def available(module: str, attr: str | None = None) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return attr is None or hasattr(mod, attr)


class Bench:
    def __init__(self, model: str, work: Path, distill_epochs: int):
        self.model = model
        self.work = work
        self.distill_epochs = distill_epochs
        self.loaded = load_zoo_model(model)
        self.shape = tuple(self.loaded.input_shape)
        self.x, y = digits_tensors(self.shape, "test")
        self.y = y.numpy()
        self.dense = logits_of(self.loaded.module, self.x)
        self.rows: list[dict] = []
        self.counter = 0

    def add(self, label: str, group: str, config: PruneConfig | None, post: str | None = None) -> dict | None:
        if config is None:
            row = {"label": label, "group": group, "pattern": "dense", "mac_reduction": 0.0,
                   "sparse_execution_mac_reduction": 0.0, **metrics(self.dense, self.dense, self.y),
                   "command": f"python -c \"from mpdeploy.models.zoo import load_zoo_model, digits_top1; "
                              f"m = load_zoo_model('{self.model}'); print(digits_top1(m.module, m.input_shape))\""}
            self.rows.append(row)
            return row
        self.counter += 1
        out = self.work / f"{self.model}-{self.counter:02d}" / "pruned"
        t0 = time.perf_counter()
        loaded = load_zoo_model(self.model)  # fresh weights: prune works in place
        prune(loaded, config, out)
        seconds = time.perf_counter() - t0
        art = load_pruned(out, "sparse")
        cmd = command(self.model, config, f"engines/{self.model}-{group}/pruned")
        if post == "distill":
            from mpdeploy.distill.config import DistillConfig
            from mpdeploy.distill.stage import distill

            t1 = time.perf_counter()
            distilled = distill(out, DistillConfig(data="digits", epochs=self.distill_epochs, seed=0))
            seconds += time.perf_counter() - t1
            art = load_pruned(distilled, "sparse")  # distill writes distilled/ beside pruned/
            cmd += (f" && mpdeploy distill engines/{self.model}-{group}/pruned --data digits "
                    f"--epochs {self.distill_epochs}")
        totals = art.manifest["totals"]
        patterns = sorted({r["pattern"] for r in art.manifest["layers"] if r["pattern"]})
        row = {"label": label, "group": group, "pattern": "+".join(patterns), "budget": config.budget,
               "saliency": config.saliency, "config": json.loads(json.dumps(asdict(config), default=str)),
               "mac_reduction": totals["mac_reduction"],
               "sparse_execution_mac_reduction": totals["sparse_execution_mac_reduction"],
               "pruned_layers": totals["pruned_layers"], "skipped_layers": totals["skipped_layers"],
               **metrics(logits_of(art.model, self.x), self.dense, self.y), "seconds": round(seconds, 1),
               "command": cmd}
        self.rows.append(row)
        logger.info("%s %-48s top1 %.4f  MAC -%.1f%%  (%.0fs)", self.model, label, row["top1"],
                    100 * row["mac_reduction"], seconds)
        return row

    def missing(self, label: str, group: str, why: str) -> None:
        self.rows.append({"label": label, "group": group, "top1": None, "note": why})
        logger.info("%s %-48s %s", self.model, label, why)


def run_model(bench: Bench) -> None:
    b = bench
    b.add("dense", "dense", None)
    nm = NM(2, 4)
    uniform = {}
    for sal in SALIENCIES:
        calib = None if sal == "magnitude" else "digits"
        uniform[sal] = b.add(f"2:4 uniform, {sal}", f"2_4-uniform-{sal}",
                             PruneConfig(pattern=nm, budget="uniform", saliency=sal, calib=calib))
    mp_rows = {}
    for sal in SALIENCIES:
        calib = None if sal == "magnitude" else "digits"
        mp_rows[sal] = b.add(f"2:4 mp (default target), {sal}", f"2_4-mp-{sal}",
                             PruneConfig(pattern=nm, budget="mp", saliency=sal, calib=calib))
    # No "2:4 mp at uniform's MAC reduction" rows: the target counts sparse-execution MACs, where uniform
    # 2:4 is already the largest cut (1:4 runs at 2:4 speed); budgets at equal targets: method_table.py.
    best = max(SALIENCIES, key=lambda s: mp_rows[s]["top1"])
    base = PruneConfig(pattern=nm, budget="mp", saliency=best, calib=None if best == "magnitude" else "digits")
    label = f"2:4 mp, {best}"
    current = base
    # Permutation, restore and distillation come from other stages still being written: a row whose
    # stage is missing or fails says so instead of stopping the benchmark.
    steps = [("permute", "mpdeploy.sparsity.permute.fold", "permute_model", lambda c: replace(c, permute=True), None),
             ("restore", "mpdeploy.sparsity.restore", "restore_layers", lambda c: replace(c, restore=True, calib="digits"), None),
             (f"distill {b.distill_epochs} ep", "mpdeploy.distill.stage", "distill", lambda c: c, "distill")]
    for name, module, attr, change, post in steps:
        group = f"2_4-mp-best-{name.split()[0]}"
        if not available(module, attr) or (post == "distill" and b.distill_epochs < 1):
            b.missing(f"{label} + {name}", group, f"not available yet ({module}.{attr} missing)")
            continue
        try:
            row = b.add(f"{label} + {name}", group, change(current), post=post)
        except Exception as exc:  # noqa: BLE001 - report the stage's state, keep benchmarking
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            b.missing(f"{label} + {name}", group, f"not available yet: {type(exc).__name__}: {first}")
            continue
        if row is not None and post is None:
            current = change(current)
            label += f" + {name}"
    for pattern in (NM(8, 16), NM(6, 12)):
        tag = f"{pattern.n}_{pattern.m}"
        calib = None if best == "magnitude" else "digits"
        try:
            u = b.add(f"{pattern} uniform, magnitude", f"{tag}-uniform", PruneConfig(pattern=pattern, budget="uniform"))
        except MpdeployError as exc:  # e.g. no reduction dimension is a multiple of M
            b.missing(f"{pattern} (all rows)", f"{tag}-uniform", f"not possible: {exc}")
            continue
        b.add(f"{pattern} mp (default target), {best}", f"{tag}-mp",
              PruneConfig(pattern=pattern, budget="mp", saliency=best, calib=calib))
        b.add(f"{pattern}+{HARDER[pattern]} mp at uniform's MAC reduction, {best}", f"{tag}-mp-sameMAC",
              PruneConfig(pattern=pattern, extra_patterns=(HARDER[pattern],), budget="mp", saliency=best, calib=calib,
                          target_mac_reduction=round(u["mac_reduction"], 6)))


def render(results: dict) -> str:
    lines = ["# Digits accuracy: dense vs N:M pruned zoo models", "",
             f"Top-1 on the scikit-learn digits test split ({results['test_images']} images), PyTorch on CPU, "
             "no fine-tuning unless the row says distill. Reproduce everything with "
             "`python benchmarks/digits_accuracy.py` (about 10-30 min on 2 cores).",
             "", "MAC reduction = 1 - kept MACs / dense MACs; sparse-exec = the part that runs on 2:4 sparse "
             "hardware (8:16 / 6:12 are accounting only). Agreement = top-1 equal to the dense model's; certified = "
             "dense margin > 2 x max logit change (audit.md).", ""]
    for model, block in results["models"].items():
        m = block["machine"]
        lines += [f"## {model}", "", f"Generated by `{block['command']}` on {m['date']} ({m['cpu_model']}, "
                  f"torch {m['torch']}, {block.get('seconds', '?')} s).", "", "| row | patterns | MAC red. | sparse-exec | top-1 | vs dense | agreement | "
                  "certified |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        dense = block["rows"][0]["top1"]
        for r in block["rows"]:
            if r.get("top1") is None:
                lines.append(f"| {r['label']} | | | | {r['note']} | | | |")
                continue
            lines.append(f"| {r['label']} | {r['pattern']} | {100 * r['mac_reduction']:.1f}% | "
                         f"{100 * r['sparse_execution_mac_reduction']:.1f}% | {100 * r['top1']:.2f}% | "
                         f"{100 * (r['top1'] - dense):+.2f} | {100 * r['agreement']:.1f}% | {100 * r['certified']:.1f}% |")
        lines += ["", "<details><summary>commands</summary>", ""]
        lines += [f"- {r['label']}: `{r['command']}`" for r in block["rows"] if r.get("command")]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def run_smoke(bench: Bench) -> None:
    """Two rows (dense, 2:4 uniform magnitude): the path every row takes, in seconds (a test runs it)."""
    bench.add("dense", "dense", None)
    bench.add("2:4 uniform, magnitude", "2_4-uniform-magnitude", PruneConfig(pattern=NM(2, 4), budget="uniform",
                                                                           saliency="magnitude"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_vit,digits_cnn")
    parser.add_argument("--distill-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true",
                        help="drop other models' rows from an existing result file instead of keeping them")
    parser.add_argument("--smoke", action="store_true", help="digits_cnn, dense + one pruned row (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.fresh = "digits_cnn", True  # the zoo model the default test suite trains anyway
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mpdeploy").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prov = provenance.begin(__file__, argv)
    results = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
               "machine": machine_info(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="digits_accuracy-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            t_model = time.perf_counter()
            bench = Bench(model, Path(tmp), args.distill_epochs)
            (run_smoke if args.smoke else run_model)(bench)
            results["test_images"] = int(len(bench.y))
            prov.zoo(model)
            results["models"][model] = {"input_shape": list(bench.shape), "rows": bench.rows,
                                        "seconds": round(time.perf_counter() - t_model, 1),
                                        "model_sha256": prov.models[f"zoo:{model}"]["sha256"]}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "digits_accuracy.json"
    if previous.exists() and not args.fresh:  # a run for one model keeps the other model's rows
        old = json.loads(previous.read_text())
        for model, block in old.get("models", {}).items():
            if model not in results["models"]:
                block.setdefault("machine", old.get("machine"))
                block.setdefault("provenance", old.get("provenance"))  # measured by another run
                block.setdefault("command", old.get("command"))
                results["models"][model] = block
    for block in results["models"].values():
        block.setdefault("machine", results["machine"])
        block.setdefault("command", results["command"])
    results = provenance.write_results(args.out / "digits_accuracy.json", results, prov)
    (args.out / "digits_accuracy.md").write_text(render(results) + "\n")
    logger.info("wrote %s (%.0f s)", args.out / "digits_accuracy.json", results["seconds"])


if __name__ == "__main__":
    main()

"""One method table: top-1 on the digits test split, 2:4, zero fine-tuning, every saliency and budget.

    python benchmarks/method_table.py [--smoke] [--models digits_vit,digits_cnn,vit6x128,resnet18_1ch]

Models: the zoo's digits_vit and digits_cnn, plus (unless --smoke) two trained here on the digits train
split: a timm ViT (depth 6, width 128, patch 4, 1 channel, 32x32) and a 1-channel ResNet18 at 32x32.
Calibration: `--calib digits` (PruneConfig defaults: 8 batches of 16 training-split images, 4 more
batches held out). Rows (all through `mpdeploy.prune.stage.prune_model`, seed 0):

- uniform 2:4 with each registered saliency (magnitude, wanda, block-cost, sparsegpt, auto);
- the budgets (mp, damage) at 90% of uniform 2:4's sparse-execution MAC reduction, patterns 2:4 + 1:4
  (uniform 2:4 is already the largest sparse-execution cut: 1:4 runs at 2:4 speed);
- the budgets also on the measured per-layer logit effect (`sensitivity`, `mp-sensitivity`);
- + restore (the OBS refit) on the default saliency;
- after `--distill-epochs` (default 3) of distillation on the digits training split: uniform magnitude,
  uniform with the default saliency, and mp with the default saliency (what `build --sparse --calib` runs).

ModelOpt (`nvidia-modelopt`) rows: only if it imports in the benchmark's own venv (--modelopt-python);
otherwise the result says "not measured here" and why. Writes benchmarks/results/method_table[_smoke].json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpdeploy.core.machine import cpu_model  # noqa: E402
from mpdeploy.models.spec import LoadedModel  # noqa: E402
from mpdeploy.prune.stage import PruneConfig, prune_model  # noqa: E402
from mpdeploy.sparsity.saliency import DEFAULT_CALIB_SALIENCY, list_saliencies  # noqa: E402
from mpdeploy.models.zoo import digits_top1, list_zoo_models, load_zoo_model  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results"
# mp / damage: weight-space damage (with / without the MP signal); sensitivity / mp-sensitivity: the same
# walks on the measured per-layer logit effect.
BUDGETS = ("mp", "damage", "sensitivity", "mp-sensitivity")
BUDGET_ROW = "(2:4+1:4, target 90% of uniform's sparse-exec cut)"
MODELOPT_ROWS = RESULTS / "modelopt_rows.json"
EXTRA = {
    "vit6x128": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10,
                                          "depth": 6, "embed_dim": 128, "num_heads": 4}, 2e-3, 0.05, 30),
    "resnet18_1ch": ("resnet18", {"in_chans": 1, "num_classes": 10}, 2e-3, 1e-4, 15),
}


def train_extra(name: str, cache: Path) -> LoadedModel:
    """Train (or load from `cache`) one of the benchmark's own models on digits at 32x32."""
    import timm
    from safetensors.torch import load_file, save_file

    from mpdeploy.models.zoo import ZooEntry, train_digits

    arch, kwargs, lr, wd, epochs = EXTRA[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    path = cache / f"{name}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        entry = ZooEntry(arch, kwargs, (1, 32, 32), epochs=epochs, lr=lr, weight_decay=wd)
        train_digits(model, entry)
        cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.eval()
    return LoadedModel(model, input_shape=(1, 32, 32), name=name, source={"kind": "timm", "name": arch, "kwargs": kwargs},
                       data_config={"mean": (0.5,), "std": (0.5,), "input_size": (1, 32, 32)})


def load(name: str, cache: Path) -> LoadedModel:
    return train_extra(name, cache) if name in EXTRA else load_zoo_model(name)


def run_row(loaded_fn, config: PruneConfig) -> dict:
    loaded = loaded_fn()
    t0, c0 = time.perf_counter(), time.process_time()
    result = prune_model(loaded, config)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    totals = result.totals
    chosen = [r["saliency_chosen"] for r in result.layers if r.get("saliency_chosen")]
    return {"top1": round(100 * digits_top1(result.model, loaded.input_shape), 2),
            "mac_reduction": round(totals["mac_reduction"], 4),
            "sparse_execution_mac_reduction": round(totals["sparse_execution_mac_reduction"], 4),
            "dense_layers": totals["skipped_layers"], "prune_wall_s": round(wall, 1), "prune_cpu_s": round(cpu, 1),
            "auto_choices": {c: chosen.count(c) for c in sorted(set(chosen))} or None}


def distill_rows(base: PruneConfig, target: float) -> list[tuple[str, PruneConfig]]:
    """The rows distilled after pruning: the magnitude baseline, the default saliency, and `build
    --sparse --calib`'s default (mp budget + default saliency) at the budgets' target."""
    return [("uniform magnitude", base),
            (f"uniform {DEFAULT_CALIB_SALIENCY}", replace(base, saliency=DEFAULT_CALIB_SALIENCY)),
            (f"mp {DEFAULT_CALIB_SALIENCY} {BUDGET_ROW}",
             replace(base, budget="mp", saliency=DEFAULT_CALIB_SALIENCY, extra_patterns=("1:4",),
                     target_mac_reduction=target))]


def distill_row(loaded_fn, config: PruneConfig, epochs: int, work: Path) -> dict:
    """Prune to an artifact, distill it `epochs` epochs on the digits training split (the default
    DistillConfig otherwise), and read top-1 before / after from the distilled manifest."""
    from mpdeploy.core import artifacts
    from mpdeploy.distill.config import DistillConfig
    from mpdeploy.distill.stage import distill
    from mpdeploy.prune.stage import prune

    loaded = loaded_fn()
    work.mkdir(parents=True, exist_ok=True)
    slug = f"{config.budget}-{config.saliency}-{len(list(work.iterdir()))}"
    pruned = prune(loaded, config, work / f"{slug}-pruned")
    t0 = time.perf_counter()
    out = distill(pruned, DistillConfig(epochs=epochs), work / f"{slug}-distilled")
    record = artifacts.read_manifest(out, "distilled")["distill"]
    totals = artifacts.read_manifest(pruned, "pruned")["totals"]
    return {"top1": round(record["top1_after"], 2), "top1_before_distill": round(record["top1_before"], 2),
            "sparse_execution_mac_reduction": round(totals["sparse_execution_mac_reduction"], 4),
            "distill_wall_s": round(time.perf_counter() - t0, 1),
            "distill_settings": {k: record["config"]["resolved"][k] for k in ("optimizer", "lr", "batch_size")}}


def column_norm_diagnosis(loaded: LoadedModel) -> dict:
    """Why Wanda can lose: per prunable layer, how uneven the input column norms ||X_j|| are (max /
    median, share of the squared norm in the top 2% of columns) and how correlated the input columns
    are (mean |corr| off the diagonal; Wanda uses only the diagonal of X^T X), from 128 digits
    calibration images."""
    from mpdeploy.models.data import digits_tensors
    from mpdeploy.sparsity.layers import find_layers, skip_reason
    from mpdeploy.sparsity.patterns import NM
    from mpdeploy.sparsity.saliency import collect_stats

    names = [layer.name for layer in find_layers(loaded.module) if skip_reason(layer, NM(2, 4), False) is None]
    x, _ = digits_tensors(loaded.input_shape, "calib")
    stats = collect_stats(loaded.module, names, list(x[:128].split(32)), [], "sparsegpt")
    out = {}
    for name in names:
        sq = stats[name].col_sq_sum
        norms = sq.sqrt()
        top = max(1, int(0.02 * len(sq)))
        h = stats[name].hessian()
        d = torch.diagonal(h).clamp_min(1e-12).sqrt()
        corr = (h / d.unsqueeze(0) / d.unsqueeze(1)).abs()
        off = (corr.sum() - torch.diagonal(corr).sum()) / (corr.numel() - corr.shape[0])
        out[name] = {"max_over_median": round(float(norms.max() / norms.median().clamp_min(1e-12)), 2),
                     "mean_abs_input_correlation": round(float(off), 3),
                     "top2pct_energy_share": round(float(sq.sort(descending=True).values[:top].sum() / sq.sum()), 3)}
    return out


def modelopt_status(python: str | None) -> str:
    if not python:
        return "not measured here: no --modelopt-python venv given"
    import subprocess

    out = subprocess.run([python, "-c", "import modelopt.torch.sparsity as s; print('ok')"], capture_output=True, text=True)
    return "importable" if out.returncode == 0 else f"not measured here: import failed: {out.stderr.strip()[-300:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="zoo models only, fewer rows")
    parser.add_argument("--models", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mpdeploy_method_table"))
    parser.add_argument("--distill-epochs", type=int, default=None,
                        help="distillation epochs for the distilled rows (default 3; 1 with --smoke; 0: none)")
    parser.add_argument("--modelopt-python", default=None, help="python of a venv with nvidia-modelopt")
    parser.add_argument("--note", default="2-core machine, nothing else running",
                        help="what else ran on the machine (wall times depend on it)")
    parser.add_argument("--render", type=Path, default=None,
                        help="only write the .md of an existing result JSON (with ModelOpt's rows, if measured)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON; the .md lands beside it (default: benchmarks/results/method_table[_smoke].json)")
    args = parser.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return
    torch.set_num_threads(args.threads)
    if args.distill_epochs is None:
        args.distill_epochs = 1 if args.smoke else 3
    models = args.models.split(",") if args.models else (["digits_vit", "digits_cnn"] if args.smoke else
                                                          ["digits_vit", "digits_cnn", "vit6x128", "resnet18_1ch"])
    saliencies = [s for s in list_saliencies() if not (args.smoke and s == "block-cost")]
    base = PruneConfig(calib="digits", budget="uniform", saliency="magnitude")
    work = Path(tempfile.mkdtemp(prefix="method_table-"))
    prov = provenance.begin(__file__)
    table: dict[str, dict] = {}
    diagnosis: dict[str, dict] = {}
    for name in models:
        loaded = load(name, args.cache)
        if name in list_zoo_models():
            prov.zoo(name)
        else:
            prov.module(name, loaded.module, "trained inside this benchmark: sha256 of its state dict")
        rows = {"dense": {"top1": round(100 * digits_top1(loaded.module, loaded.input_shape), 2)}}
        state = {k: v.clone() for k, v in loaded.module.state_dict().items()}

        def fresh(loaded=loaded, state=state):
            loaded.module.load_state_dict(state)
            return loaded

        for sal in saliencies:
            rows[f"uniform {sal}"] = run_row(fresh, replace(base, saliency=sal))
            print(name, sal, rows[f"uniform {sal}"], flush=True)
        # Under sparse-execution accounting uniform 2:4 is already the largest cut (1:4 runs at 2:4 speed),
        # so budgets are compared at 90% of it: which tenth of the prunable MACs stays dense.
        target = round(0.9 * rows["uniform magnitude"]["sparse_execution_mac_reduction"], 4)
        for budget in BUDGETS:
            for sal in ("magnitude", DEFAULT_CALIB_SALIENCY):
                cfg = replace(base, budget=budget, saliency=sal, extra_patterns=("1:4",), target_mac_reduction=target)
                row = f"{budget} {sal} {BUDGET_ROW}"
                rows[row] = {**run_row(fresh, cfg), "target_sparse_execution_mac_reduction": target}
                print(name, row, rows[row], flush=True)
        rows[f"uniform {DEFAULT_CALIB_SALIENCY} + restore"] = run_row(fresh, replace(base, saliency=DEFAULT_CALIB_SALIENCY, restore=True))
        if args.distill_epochs:
            for label, cfg in distill_rows(base, target):
                rows[f"{label}, {args.distill_epochs} distill epochs"] = distill_row(fresh, cfg, args.distill_epochs, work / name)
                print(name, label, rows[f"{label}, {args.distill_epochs} distill epochs"], flush=True)
        table[name] = rows
        diagnosis[name] = column_norm_diagnosis(fresh())
        print(name, json.dumps(rows, indent=1), flush=True)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "loadavg_1m": round(os.getloadavg()[0], 2),
                          "note": args.note},
              "command": "python benchmarks/method_table.py" + (" --smoke" if args.smoke else ""),
              "eval": "top-1 (%) on the digits test split (539 images), zero fine-tuning",
              "modelopt": modelopt_status(args.modelopt_python), "models": table,
              "input_column_norms": diagnosis}
    target = args.out or RESULTS / ("method_table_smoke.json" if args.smoke else "method_table.json")
    result = provenance.write_results(target, result, prov)
    target.with_suffix(".md").write_text(markdown(result))


def modelopt_rows(names: list[str]) -> dict[str, dict[str, str]]:
    """ModelOpt's rows from benchmarks/modelopt_rows.py's result (run in ModelOpt's own venv), as cells."""
    if not MODELOPT_ROWS.exists():
        return {}
    measured = json.loads(MODELOPT_ROWS.read_text()).get("models", {})
    rows: dict[str, dict[str, str]] = {}
    for mode in ("sparse_magnitude", "sparsegpt"):
        for name in names:
            entry = measured.get(name, {}).get(mode)
            if entry is not None:
                cell = f"{100 * entry['top1']:.2f}" if "top1" in entry else "crashes: " + entry["error"].split(":")[0]
                rows.setdefault(f"ModelOpt {mode} (uniform 2:4, own venv)", {})[name] = cell
    return rows


def markdown(result: dict) -> str:
    names = list(result["models"])
    rows = list(dict.fromkeys(r for m in names for r in result["models"][m]))
    lines = [f"# method table ({result['command']})", "", f"{result['eval']}; {result['machine']['date']}, "
             f"{result['machine']['cpu']}, {result['machine']['note']}.", "",
             "| row | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in rows:
        cells = []
        for m in names:
            e = result["models"][m].get(r)
            if e is None:
                cells.append("")
            elif "sparse_execution_mac_reduction" in e:
                cells.append(f"{e['top1']:.2f} ({100 * e['sparse_execution_mac_reduction']:.1f}%)")
            else:
                cells.append(f"{e['top1']:.2f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    for label, cells in modelopt_rows(names).items():
        lines.append(f"| {label} | " + " | ".join(cells.get(m, "") for m in names) + " |")
    lines += ["", "Cells: top-1 (sparse-execution MAC reduction). ModelOpt rows: `benchmarks/modelopt_rows.py` "
              "(`modelopt_rows.json`), same models and test split, 128 calibration images; ModelOpt also sparsifies "
              "the layers mpdeploy keeps dense (the 1-channel stem, the head), so its cut is slightly larger."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Render the README's measured figures from benchmarks/results/, between marker comments.

    python benchmarks/render_readme.py            # rewrite the blocks in README.md
    python benchmarks/render_readme.py --check    # exit 1 if README.md differs from a fresh render

A block is `<!-- results:NAME -->` ... `<!-- /results:NAME -->`; its text is BLOCKS[NAME](results),
made only from the results files (each block names its file, commit and date). Nothing outside the
markers is touched. tests/test_readme_numbers.py re-renders in memory and compares.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_changed  # noqa: E402  (benchmarks/provenance.py, beside this script)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


class Results:
    """The results files, read once; a missing file is None (the block then says how to make it)."""

    def __init__(self, root: Path = RESULTS):
        self.root = root
        self._cache: dict[str, dict | None] = {}

    def __call__(self, name: str) -> dict | None:
        if name not in self._cache:
            path = self.root / name
            self._cache[name] = json.loads(path.read_text()) if path.is_file() else None
        return self._cache[name]


# ---- formatting helpers -------------------------------------------------------------------------

def source(name: str, data: dict | None, script: str | None = None) -> str:
    """`file`, commit, date, load: where a block's numbers come from."""
    prov = (data or {}).get("provenance")
    if not prov:
        return f"`benchmarks/results/{name}` (written before commits were recorded: commit unknown)"
    git = prov.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" + uncommitted changes" if code_changed(git) else "")
    load = prov.get("loadavg_before", [None])[0], prov.get("loadavg_after", [None])[0]
    return (f"`benchmarks/results/{name}`, commit {commit}, {prov['date'][:10]}, {prov['machine']['cores']}-core "
            f"{prov['machine']['cpu_model']}, load average {load[0]} before / {load[1]} after")


def missing(name: str, script: str) -> str:
    return f"Not measured yet: `python benchmarks/{script}` writes `benchmarks/results/{name}`.\n"


def own_run(row: dict, data: dict) -> str:
    """", its own run: commit C, DATE" for a row kept from an earlier run of a per-model script (the row
    carries that run's provenance); "" when the file's provenance is the row's."""
    prov = row.get("provenance") or {}
    commit = (prov.get("git") or {}).get("commit")
    if not commit or commit == (((data.get("provenance") or {}).get("git")) or {}).get("commit"):
        return ""
    dirty = " + uncommitted changes" if code_changed(prov["git"]) else ""
    return f", its own run: commit {commit[:10]}{dirty}, {prov['date'][:10]}"


def pct(v: float, digits: int = 2) -> str:
    return f"{100 * v:.{digits}f}"


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


def sci(v: float) -> str:
    return f"{v:.1e}"


def shipped_zoo_sha256() -> dict[str, str]:
    """The sha256 of each zoo model's shipped weights file, from the zoo's registry."""
    from mpdeploy.models.zoo import list_zoo_models, zoo_sha256

    return {f"zoo:{name}": zoo_sha256(name) for name in list_zoo_models()}


def zoo_hashes(data: dict | None) -> str:
    """Which zoo weights a file measured: the shipped ones (sha256 prefix), or a warning that they differ."""
    models = ((data or {}).get("provenance") or {}).get("models", {})
    zoo = {k: v.get("sha256") for k, v in models.items() if k.startswith("zoo:")}
    if not zoo:
        return "zoo weights not recorded (measured before the zoo weights were shipped)"
    shipped = shipped_zoo_sha256()
    other = [k for k, sha in zoo.items() if sha != shipped.get(k)]
    if other:
        return f"**measured on weights other than the shipped ones for {', '.join(other)}**"
    return "the shipped zoo weights (" + ", ".join(f"{k} `{sha[:12]}`" for k, sha in zoo.items()) + ")"


# ---- blocks -------------------------------------------------------------------------------------

def demo(r: Results) -> str:
    d = r("demo.json")
    if d is None:
        return missing("demo.json", "demo.py")
    ratio = d["ort_speed_ratio"]
    return (
        f"Measured by `benchmarks/demo.py` ({source('demo.json', d)}; {zoo_hashes(d)}), "
        f"the `mpdeploy build --sparse` step with the zoo model already in place: {d['wall_s']:.1f} s wall, "
        f"{d['cpu_s']:.1f} CPU s, {gib(d['peak_rss_mib'])} peak RSS; "
        f"{pct(d['sparse_execution_mac_reduction'], 1)}% sparse-execution MAC reduction, "
        f"saliency chosen per layer: {', '.join(f'{k} on {v}' for k, v in d['saliency_chosen'].items())}; "
        f"top-1 {d['top1_dense']:.2f}% (dense) -> {d['top1_pruned']:.2f}% (pruned, before distillation) -> "
        f"{d['top1_distilled']:.2f}% (distilled) on {d['top1_split']}, audit {'passed' if d['audit_passed'] else 'FAILED'}, "
        f"ONNX Runtime vs PyTorch {sci(d['ort_vs_pytorch_max_abs_diff'])} at export; the ORT CPU speed ratio "
        f"(dense p50 / sparse p50) is {ratio['min']:.2f}-{ratio['max']:.2f} over batch sizes "
        f"{', '.join(map(str, ratio['batches']))}, because ONNX Runtime's CPU provider has no 2:4 kernels."
        + _demo_other_isa(r, d) + "\n")


def _demo_other_isa(r: Results, d: dict) -> str:
    """The same demo with torch's kernels held to AVX2 (another kind of CPU), when measured."""
    a = r("demo_avx2.json")
    if a is None:
        return ""
    keys = ("top1_dense", "top1_pruned", "top1_distilled")
    same = all(abs(a[k] - d[k]) < 1e-9 for k in keys)
    return (f" With torch's kernels held to AVX2 (`benchmarks/demo.py --cpu-isa avx2`, torch reports "
            f"{a['cpu_capability']}; {source('demo_avx2.json', a)}), as on a CPU without AVX-512: top-1 "
            + " -> ".join(f"{a[k]:.2f}%" for k in keys)
            + (", the same figures" if same else ", figures that differ from the default run")
            + f"; ONNX Runtime vs PyTorch {sci(a['ort_vs_pytorch_max_abs_diff'])}; "
            + ("the same" if a["saliency_chosen"] == d["saliency_chosen"] and
               abs(a["sparse_execution_mac_reduction"] - d["sparse_execution_mac_reduction"]) < 1e-12
               else "different") + " prune decisions (saliency per layer, MAC reduction).")


def _mt_cell(e: dict | None, mac: bool = False) -> str:
    if e is None:
        return ""
    cell = f"{e['top1']:.2f}"
    return cell + (f" ({pct(e['sparse_execution_mac_reduction'], 1)}%)" if mac else "")


def _modelopt(r: Results, names: list[str]) -> tuple[dict[str, dict], str]:
    mo = r("modelopt_rows.json") or {}
    version = ((mo.get("modelopt_venv") or {}).get("versions") or {}).get("nvidia-modelopt")
    return mo.get("models", {}), f"ModelOpt {version}" if version else "ModelOpt (version not recorded)"


def method_saliency(r: Results) -> str:
    d = r("method_table.json")
    if d is None:
        return missing("method_table.json", "method_table.py")
    names = list(d["models"])
    mo, mo_label = _modelopt(r, names)
    rows = [("dense", lambda m: f"{d['models'][m]['dense']['top1']:.2f}")]
    rows.append(("magnitude / wanda / block-cost", lambda m: " / ".join(
        _mt_cell(d["models"][m].get(f"uniform {s}")) for s in ("magnitude", "wanda", "block-cost"))))
    rows.append(("sparsegpt / **auto (default with `--calib`)**", lambda m: " / ".join(
        _mt_cell(d["models"][m].get(f"uniform {s}")) for s in ("sparsegpt", "auto"))))

    def mo_cell(m: str, mode: str) -> str:
        e = mo.get(m, {}).get(mode)
        return "" if e is None else (f"{100 * e['top1']:.2f}" if "top1" in e else "crashes")

    rows.append((f"{mo_label} sparse_magnitude / sparsegpt", lambda m: f"{mo_cell(m, 'sparse_magnitude')} / "
                                                                        f"{mo_cell(m, 'sparsegpt')}"))

    def margin(m: str) -> str:
        best = [100 * e["top1"] for e in mo.get(m, {}).values() if isinstance(e, dict) and "top1" in e]
        auto = d["models"][m].get("uniform auto")
        return f"{auto['top1'] - max(best):+.2f}" if best and auto else ""

    rows.append(("auto minus ModelOpt's best", margin))
    lines = ["| uniform 2:4, zero fine-tuning | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fn(m) for m in names) + " |" for label, fn in rows]
    chosen = {m: (d["models"][m].get("uniform auto") or {}).get("auto_choices") for m in names}
    mo_dates = sorted({e.get("date", "")[:10] for e in mo.values() if isinstance(e, dict)} - {""})
    return ("\n".join(lines) + "\n\n"
            f"From {source('method_table.json', d)}; {zoo_hashes(d)}. `auto`'s choice per layer: "
            + "; ".join(f"{m} " + (", ".join(f"{k} on {v} layers" for k, v in chosen[m].items()) if chosen[m] else "not recorded")
                        for m in names) + ". ModelOpt's rows: `benchmarks/results/"
            f"modelopt_rows.json` ({', '.join(mo_dates) or 'date not recorded'}"
            f"{'' if (r('modelopt_rows.json') or {}).get('provenance') else ', commit and zoo weights not recorded'}).\n")


def wanda_diagnosis(r: Results) -> str:
    d = r("method_table.json")
    if d is None or not d.get("input_column_norms"):
        return missing("method_table.json", "method_table.py")
    lines = []
    for model, layers in d["input_column_norms"].items():
        if not any(k.endswith("qkv") for k in layers):  # the diagnosis is about the ViTs
            continue
        corr = [v["mean_abs_input_correlation"] for v in layers.values()]
        even = [v["max_over_median"] for k, v in layers.items() if k.endswith(("qkv", "fc1"))]
        fc2 = [v for k, v in layers.items() if k.endswith("fc2")]
        text = (f"{model}: mean |corr| off the diagonal {min(corr):.2f}-{max(corr):.2f} per layer; column-norm "
                f"max/median {min(even):.1f}-{max(even):.1f} for qkv and fc1")
        if fc2:
            text += (f", {min(v['max_over_median'] for v in fc2):.1f}-{max(v['max_over_median'] for v in fc2):.1f} "
                     f"for fc2, whose top 2% of columns carry up to {pct(max(v['top2pct_energy_share'] for v in fc2), 0)}% "
                     f"of the energy")
        lines.append(f"  - {text}.")
    return "\n".join(lines) + "\n"


BUDGET_ROW = "(2:4+1:4, target 90% of uniform's sparse-exec cut)"


def method_budgets(r: Results) -> str:
    d = r("method_table.json")
    if d is None:
        return missing("method_table.json", "method_table.py")
    names = list(d["models"])
    lines = [f"| budget | magnitude saliency: {' / '.join(names)} | auto saliency (the default with `--calib`) |",
             "|---|---|---|"]
    for budget in ("mp", "damage", "sensitivity", "mp-sensitivity"):
        cells = []
        for sal in ("magnitude", "auto"):
            parts = []
            for m in names:
                e = d["models"][m].get(f"{budget} {sal} {BUDGET_ROW}")
                if e is None:
                    parts.append("")
                    continue
                target = e.get("target_sparse_execution_mac_reduction")
                off = target is not None and abs(e["sparse_execution_mac_reduction"] - target) > 0.002
                parts.append(_mt_cell(e, mac=off))
            cells.append(" / ".join(parts))
        lines.append(f"| {budget} | {cells[0]} | {cells[1]} |")
    return ("\n".join(lines) + "\n\n"
            f"Sparse-execution MAC cut in brackets where it differs from the target; {source('method_table.json', d)}.\n")


def method_distilled(r: Results) -> str:
    d = r("method_table.json")
    if d is None:
        return missing("method_table.json", "method_table.py")
    names = list(d["models"])
    key = next((k for k in d["models"][names[0]] if k.startswith(f"mp auto {BUDGET_ROW}, ") and "distill" in k), None)
    if key is None:
        return "No distilled rows in `benchmarks/results/method_table.json`.\n"
    epochs = key.rsplit(", ", 1)[1]
    after = " / ".join(_mt_cell(d["models"][m].get(key)) for m in names)
    dense = " / ".join(f"{d['models'][m]['dense']['top1']:.2f}" for m in names)
    um = " / ".join(_mt_cell(d["models"][m].get(f"uniform magnitude, {epochs}")) for m in names)
    ua = " / ".join(_mt_cell(d["models"][m].get(f"uniform auto, {epochs}")) for m in names)
    return (f"After {epochs} (same file): `build --sparse --calib`'s defaults (mp + auto) reach {after} "
            f"({' / '.join(names)}) against dense {dense}; uniform magnitude + distillation {um}, uniform auto + "
            f"distillation {ua}.\n")


def prune_timing(r: Results) -> str:
    d = r("prune_timing.json")
    if d is None:
        return missing("prune_timing.json", "prune_timing.py")
    names = {"vit_base_patch16_224": "ViT-B/16", "resnet50": "ResNet50"}
    parts = []
    for key, label in names.items():
        m = d["models"].get(key)
        if m is None:
            continue
        peak = m.get("peak_rss_mib")
        parts.append(f"{label} {m['prune_s']:.1f} s (goal {d['goal_s'][key]} s; fit {m['steps_s']['fit']:.1f} s, "
                     f"masks {m['steps_s']['mask']:.1f} s)"
                     + (f", {m['cpu_s']:.1f} CPU s for the whole process" if m.get("cpu_s") else "")
                     + f", peak RSS {gib(peak) if peak else 'not recorded'}, "
                     f"load average {m.get('loadavg_before', ['?'])[0]} at its start")
    return (f"Time and memory (`benchmarks/prune_timing.py`, `--budget mp`, magnitude saliency, each model in "
            f"its own process; {source('prune_timing.json', d)}): " + "; ".join(parts) + ".\n")


def int8_ort(r: Results) -> str:
    d = r("int8_ort.json")
    if d is None:
        return missing("int8_ort.json", "int8_ort.py")
    m = d["machine"]
    flags = "VNNI" if m.get("vnni") else "no VNNI"
    flags += ", AMX" if m.get("amx") else ", no AMX"
    acc, speed = [], []
    for name, e in d["models"].items():
        t = e["top1"]
        acc.append(f"{name.split(':')[-1]} {t['sparse']['int8']:.2f} vs {t['sparse']['fp32']:.2f} (2:4) and "
                   f"{t['dense']['int8']:.2f} vs {t['dense']['fp32']:.2f} (dense twin)")
        for b, lat in (e.get("latency") or {}).items():
            speed.append(f"{name.split(':')[-1]} {b.replace('batch', 'batch ')} {lat['int8']['cpu_ms_mean']:.2f} vs "
                         f"{lat['fp32']['cpu_ms_mean']:.2f} ms ({lat['speedup_int8_vs_fp32_cpu']:.2f}x)")
    worst = max(e["top1"][v]["int8_drop_points"] for e in d["models"].values() for v in ("sparse", "dense"))
    return (f"Measured with ONNX Runtime on this CPU ({m['cpu_model']}, {flags}; `benchmarks/int8_ort.py`, "
            f"{source('int8_ort.json', d)}; {zoo_hashes(d)}): INT8 top-1 vs FP32 on " + "; ".join(acc) +
            f": the largest INT8 loss is {worst:.2f} points. CPU time per call (1 thread, process CPU time), "
            f"INT8 vs FP32: " + "; ".join(speed) + ".\n")


def export_checks(r: Results) -> str:
    d = r("export_checks.json")
    if d is None or "models" not in d:
        return missing("export_checks.json", "export_checks.py")
    labels = {"vit_base_patch16_224": "ViT-B/16", "resnet50": "ResNet50", "convnextv2_base": "ConvNeXtV2-Base",
              "vit_tiny_patch16_224": "ViT-Ti"}
    parts, diffs = [], []
    for e in d["models"].values():
        label = labels.get(e["model"], e["model"]) + (f" with ToMe r={e['tome_r']}" if e["tome_r"] else "")
        parts.append(f"{label} ({e['polygraphy_confirmed_2_4']}/{e['annotated_2_4']} confirmed by Polygraphy, "
                     f"{e['eligible_2_4']}/{e['annotated_2_4']} eligible, checkers "
                     f"{'agree' if e['checker_polygraphy_agree'] else 'DISAGREE'})")
        diffs.append(f"{sci(e['ort_max_abs_diff_sparse'])}")
    return (f"Measured (`benchmarks/export_checks.py`, {source('export_checks.json', d)}; random init, 2:4 uniform, "
            f"legacy exporter): " + ", ".join(parts) + f"; ONNX Runtime vs PyTorch max abs diff {', '.join(diffs)}.\n")


def distill_digits(r: Results) -> str:
    d = r("distill_digits.json")
    if d is None:
        return missing("distill_digits.json", "distill_digits.py")
    lines = ["| model | dense | 2:4 pruned | + distillation |", "|---|---|---|---|"]
    for e in d["results"]:
        lines.append(f"| {e['model']} | {e['dense_top1']:.2f} | {e['pruned_top1']:.2f} | {e['distilled_top1']:.2f} |")
    e0 = d["results"][0]
    return ("\n".join(lines) + f"\n\n{len(e0['epochs'])} epochs, {e0['budget']} {e0['pattern']} {e0['saliency']}, "
            f"{e0['test_images']} test images; {source('distill_digits.json', d)}; {zoo_hashes(d)}.\n")


def build_e2e(r: Results) -> str:
    files = [f for f in ("build_e2e.json", "build_e2e_regnety_008.json") if r(f)]
    if not files:
        return missing("build_e2e.json", "build_e2e.py")
    labels = {"resnet50": "ResNet50", "vit_base_patch16_224": "ViT-B/16", "regnety_008": "RegNetY-008"}
    parts, sources = [], []
    for f in files:
        d = r(f)
        sources.append(source(f, d))
        for b in d["builds"]:
            peak = b.get("peak_rss_mib")
            mem = f", peak RSS {gib(peak)}" if peak else ""
            parts.append(f"{labels.get(b['model'], b['model'])} {b['wall_s']:.1f} s wall ({b['cpu_s']:.1f} CPU s{mem}, "
                         f"load average {b['loadavg_before'][0]}-{b['loadavg_after'][0]}, exit {b['returncode']}"
                         f"{own_run(b, d)})")
    note = "" if all(b.get("peak_rss_mib") for f in files for b in r(f)["builds"]) else (
        " Peak memory is left out where the file holds only a running maximum over its builds "
        "(`peak_rss_mib_any_child`), not each build's own.")
    goal = r(files[0])["goal_s_per_model"]
    return ("Real-size models (`benchmarks/build_e2e.py`, `mpdeploy build timm:NAME --sparse --backend ort "
            f"--weights random` with the default audit; goal: {goal:.0f} s wall per model): " + "; ".join(parts) +
            ". From " + "; ".join(sources) + "." + note + "\n")


def audit_imagefolder(r: Results) -> str:
    d = r("audit_imagefolder.json")
    if d is None:
        return missing("audit_imagefolder.json", "audit_imagefolder.py")
    a = d["audit"]
    return (f"An audit over a generated ImageFolder of {d['images']:,} JPEGs ({d['classes']:,} classes, "
            f"`benchmarks/audit_imagefolder.py`, `--time-budget 0` so every image is evaluated; "
            f"{source('audit_imagefolder.json', d)}) took {a['wall_s']:.1f} s wall ({a['cpu_s']:.1f} CPU s, load average "
            f"{d['loadavg_before'][0]}-{d['loadavg_after'][0]}) with a peak of {a['peak_pss_mib_tree_sampled']} MiB "
            f"(PSS of the audit and its DataLoader workers, sampled every 50 ms; goal: under {d['goal_peak_mib']} MiB), "
            f"{d['progress_lines']} progress lines in its log.\n")


DIGITS_ROWS = (
    ("dense", ["dense"]),
    ("2:4 uniform, magnitude / wanda / block-cost", ["2:4 uniform, magnitude", "2:4 uniform, wanda", "2:4 uniform, block-cost"]),
    ("2:4 uniform, sparsegpt / auto", ["2:4 uniform, sparsegpt", "2:4 uniform, auto"]),
    ("2:4 mp (default target), magnitude", ["2:4 mp (default target), magnitude"]),
    ("2:4 mp (default target), auto", ["2:4 mp (default target), auto"]),
    ("+ permutation", ["2:4 mp, sparsegpt + permute"]),
    ("+ restore", ["2:4 mp, sparsegpt + permute + restore"]),
    ("+ distillation, 3 epochs", ["2:4 mp, sparsegpt + permute + restore + distill 3 ep"]),
    ("8:16 uniform magnitude / mp sparsegpt (audit-only)", ["8:16 uniform, magnitude", "8:16 mp (default target), sparsegpt"]),
)


def digits_accuracy(r: Results) -> str:
    d = r("digits_accuracy.json")
    if d is None:
        return missing("digits_accuracy.json", "digits_accuracy.py")
    names = list(d["models"])
    by_label = {m: {row["label"]: row for row in d["models"][m]["rows"]} for m in names}

    def cell(m: str, labels: list[str]) -> str:
        rows = [by_label[m].get(label) for label in labels]
        if any(row is None or row.get("top1") is None for row in rows):
            return "not run"
        cut = rows[-1].get("sparse_execution_mac_reduction")
        return " / ".join(pct(row["top1"]) for row in rows) + (f" ({pct(cut, 1)}%)" if cut else "")

    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(m, labels) for m in names) + " |" for label, labels in DIGITS_ROWS]
    return ("\n".join(lines) + f"\n\n{d.get('test_images')} test images; {source('digits_accuracy.json', d)}; "
            f"{zoo_hashes(d)}.\n")


def restore_timing(r: Results) -> str:
    d = r("restore_timing.json")
    if d is None:
        return missing("restore_timing.json", "restore_timing.py")
    labels = {"resnet50": "ResNet50", "vit_base_patch16_224": "ViT-B/16"}
    parts, errs = [], []
    for key, m in d["models"].items():
        # Before provenance.run_child the child's ru_maxrss included the parent's image: not shown.
        peak = m.get("peak_rss_mib") if d.get("provenance") else None
        load = m.get("loadavg_before")
        parts.append(f"**{labels.get(key, key)} {m['restore_wall_s']:.1f} s wall** ({m['restore_cpu_s']:.1f} CPU s, "
                     f"{m['layers_improved']} of {m['layers']} layers improved"
                     f"{f', peak RSS {gib(peak)}' if peak else ''}"
                     f"{f', load average {load[0]} at its start' if load else ''}{own_run(m, d)})")
        errs += [f"{labels.get(key, key)} {layer} {c['obs_vs_exact']:.3f}" for layer, c in m["layer_error_comparison"].items()]
    return (f"Restore speed and quality (`benchmarks/restore_timing.py`, random-init timm models, uniform 2:4 "
            f"magnitude masks; {source('restore_timing.json', d)}): " + " and ".join(parts) +
            f" (goal: {d['goal']}){'' if d.get('provenance') else '; peak memory not shown: this file predates per-run peaks'}."
            f" Layer output error on held-out inputs, OBS+CG / exact least squares: " +
            ", ".join(errs) + ".\n")


def permutation(r: Results) -> str:
    d = r("permutation.json")
    if d is None:
        return missing("permutation.json", "permutation.py")
    s = {(e["kind"], e["shape"], e["pattern"]): e for e in d["summary"]}
    small_r, small_t = s.get(("random", "64x128", "2:4")), s.get(("trained-like", "64x128", "2:4"))
    big_r, big_t = s.get(("random", "768x3072", "2:4")), s.get(("trained-like", "768x3072", "2:4"))
    text = (f"Measured (`benchmarks/permutation.py`, one thread; full tables in `benchmarks/results/permutation.md`; "
            f"{source('permutation.json', d)}): on 64x128 random matrices the search recovers "
            f"{pct(small_r['gap_recovered'], 1)}% of the 2:4-vs-unstructured gap (min {pct(small_r['gap_recovered_min'], 1)}% "
            f"over {small_r['seeds']} seeds; NVIDIA ASP reports about 35%, [docs/method.md](docs/method.md) section 4), "
            f"{pct(small_t['gap_recovered'], 1)}% on heavy-tailed \"trained-like\" ones")
    if big_r and big_t:
        text += (f"; on 768x3072 it recovers {pct(big_r['gap_recovered'], 1)}% (random) / "
                 f"{pct(big_t['gap_recovered'], 1)}% (trained-like) in {big_r['seconds_cpu']:.2f} / "
                 f"{big_t['seconds_cpu']:.2f} s of CPU time")
    return text + ".\n"


def tome_ort_latency(r: Results) -> str:
    d = r("tome_ort_latency.json")
    if d is None:
        return missing("tome_ort_latency.json", "tome_ort_latency.py")
    rows = [e for e in d["results"] if e["r"]]
    by_r: dict[int, list[dict]] = {}
    for e in rows:
        by_r.setdefault(e["r"], []).append(e)
    parts = [f"r={k} " + " / ".join(f"{e['speedup_vs_dense']:.2f}x (batch {e['batch']})" for e in v) +
             f" against a MAC ratio that allows {v[0]['mac_speedup']:.2f}x" for k, v in by_r.items()]
    fr = [e["fraction_of_mac_ratio"] for e in rows]
    return (f"ONNX Runtime CPU, ViT-B/16, same run ({source('tome_ort_latency.json', d)}): " + "; ".join(parts) +
            f": {pct(min(fr), 0)}-{pct(max(fr), 0)}% of the MAC ratio.\n")


def test_suite(r: Results) -> str:
    d = r("test_suite.json")
    if d is None:
        return missing("test_suite.json", "fresh_clone_tests.py")
    rows = ["| commit | beside it | pytest's summary | minutes, with the install | failed |", "|---|---|---|---:|---|"]
    for x in d["runs"]:
        failed = [line.split()[1] for line in x.get("outcomes", []) if line.startswith(("FAILED", "ERROR"))]
        named = ", ".join(f"`{f}`" for f in failed) if failed else ("-" if "outcomes" in x else "names not recorded")
        rows.append(f"| {x['commit'][:7]} | {'a CPU-bound process' if x.get('hog') else 'nothing of ours'} "
                    f"| {x['summary']} | {x['wall_s'] / 60:.1f} | {named} |")
    return (f"`make test` on fresh clones, every run kept ({source('test_suite.json', d)}):\n\n" + "\n".join(rows) + "\n")


def densify_backend(r: Results) -> str:
    d = r("densify_backend.json")
    if d is None:
        return missing("densify_backend.json", "densify_backend.py")
    rows = ["| model | pruned for | layers pruned | top-1 | sparse-execution MAC cut claimed | MAC cut that runs sparse on torch |",
            "|---|---|---:|---:|---:|---:|"]
    for name, m in d["models"].items():
        for key, label in (("pruned_for_trt", "TensorRT's rules"), ("pruned_for_torch", "torch's plan")):
            x = m.get(key) or {}
            top1 = f"{pct(x['top1'])}%" if x.get("top1") is not None else "-"
            if x.get("refused"):
                rows.append(f"| {name} | {label} | refused: nothing runs sparse | - | - | - |")
                continue
            rows.append(f"| {name} | {label} | {x.get('pruned_layers')} | {top1} | {pct(x['mac_cut_claimed'], 1)}% "
                        f"| {pct(x['mac_cut_on_torch'], 1)}% |")
    t = d["densify_on_trt_report"]
    return (f"Measured by `benchmarks/densify_backend.py` ({source('densify_backend.json', d)}; {zoo_hashes(d)}; "
            f"uniform budget, magnitude saliency; top-1 on digits for the zoo model only, timm models random init; "
            f"dense digits_cnn {pct(d['models']['digits_cnn']['top1_dense'])}%):\n\n" + "\n".join(rows) +
            f"\n\nDensify on a TensorRT log for digits_cnn ({t['report']}): {t['layers_returned']} of "
            f"{t['layers_pruned']} pruned layers given back, top-1 {pct(t['top1_before'])}% -> {pct(t['top1_after'])}%, "
            f"claimed MAC cut {pct(t['mac_cut_claimed_before'], 1)}% -> {pct(t['mac_cut_claimed_after'], 1)}%.\n")


def prune_speed(r: Results) -> str:
    d = r("prune_speed.json")
    if d is None:
        return missing("prune_speed.json", "prune_speed.py")
    parts = []
    for name, run in d["runs"].items():
        a = run.get("after") or {}
        ph = a.get("phases") or {}
        dtype = (a.get("calibration") or {}).get("forward_dtype")
        text = (f"{name}: {a['wall_s']:.0f} s wall, {a['cpu_s']:.0f} CPU s (goal {d['goal_s'][name]} s wall"
                f"{': met' if a['wall_s'] <= d['goal_s'][name] else ': missed'}), peak RSS {gib(a['peak_rss_mib'])}, "
                f"load average {a['loadavg_before'][0]} at its start; CPU s by phase: "
                + ", ".join(f"{k} {v['cpu_s']:.0f}" for k, v in ph.items()))
        if dtype:
            text += f"; calibration forward in {dtype}"
        for label, other in run.items():
            if label.startswith("after_") and not label.startswith("after_threads") and "wall_s" in other:
                err, mine = other.get("held_out_layer_error") or {}, a.get("held_out_layer_error") or {}
                text += (f"; with --calib-dtype {label[6:]}: {other['wall_s']:.0f} s wall, {other['cpu_s']:.0f} CPU s, "
                         f"held-out layer error mean {err.get('mean', float('nan')):.4f} (default "
                         f"{mine.get('mean', float('nan')):.4f}), max {err.get('max', float('nan')):.4f} (default "
                         f"{mine.get('max', float('nan')):.4f})")
        parts.append(text)
    return (f"`{d['command']}` (`benchmarks/prune_speed.py`, {source('prune_speed.json', d)}): " + "; ".join(parts)
            + f". Note recorded with the run: {d['note']}\n")


def sweep_vs_builds(r: Results) -> str:
    d = r("sweep_vs_builds.json")
    if d is None:
        return missing("sweep_vs_builds.json", "sweep_vs_builds.py")
    runs = d["runs"]
    loads = [x["loadavg_before"][0] for name in runs for x in runs[name]]
    per_round = "; ".join(f"round {i}: {x['sweep']:.2f}x and {x['promote_2']:.2f}x"
                          for i, x in enumerate(d["ratio_per_round"], 1))
    cpu = d["cpu_s_all_processes"]

    def verdict(name: str, ratio: float) -> str:
        goal = d["goals"][name]
        return f"goal {goal}x: met" if d["met"][name] else f"goal {goal}x: missed, {ratio / goal:.2f} times the goal"

    c = d["sweep_choice"]
    if c.get("id") is None:
        choice = "no choice (no trial met the constraint)"
    elif c["id"].startswith("dense"):
        choice = (f"the dense baseline ({c['verdict']}; dense top-1 {pct(c['top1_dense'])}%): ONNX Runtime's CPU "
                  "provider has no sparse kernels, so on CPU no sparse engine is measurably faster")
    else:
        config = " ".join(f"{k}={v}" for k, v in c["config"].items())
        low, high = c.get("speedup_b8_ci95") or (None, None)
        noise = (f" (95% interval {low:.2f}x to {high:.2f}x" + (": it holds 1.0, no measurable speedup; ONNX Runtime's "
                 "CPU provider has no sparse kernels, so on CPU the choice among trials and dense is timing noise. "
                 "This run predates the rule that a sparse trial competes only when its interval lies entirely "
                 "above 1.0 (`mpdeploy/pipeline/sweep/choice.py`); under it this trial loses to the dense "
                 "baseline)" if low <= 1.0 <= high else ")")) if low is not None and high is not None else ""
        choice = (f"{c['id']} ({config}): top-1 {pct(c['top1_sparse'])}% against {pct(c['top1_dense'])}% dense, "
                  f"MAC cut {pct(c['mac_cut'], 1)}%, p50@b8 {c['p50_b8_ms']:.3g} ms, speedup over its dense twin "
                  f"{c['speedup_b8']:.2f}x{noise}")
    text = (f"{'An' if str(d['trials'])[0] == '8' else 'A'} {d['trials']}-trial sweep of {d['model']} (`--grid "
            + " ".join(f"{k}={','.join(v)}" for k, v in d["grid"].items())
            + f"`) against the same configs run one after another with `mpdeploy build` (`benchmarks/"
            f"sweep_vs_builds.py`, {source('sweep_vs_builds.json', d)}; {zoo_hashes(d)}), {d['rounds']} round(s) "
            f"back to back in reversing order, mean wall times: the builds {d['builds_wall_s']:.0f} s, the sweep "
            f"{d['sweep_wall_s']:.0f} s = {d['ratio_sweep_over_builds']:.2f}x "
            f"({verdict('sweep', d['ratio_sweep_over_builds'])}), `--promote 2` {d['promote2_wall_s']:.0f} s = "
            f"{d['ratio_promote2_over_builds']:.2f}x ({verdict('promote_2', d['ratio_promote2_over_builds'])}); "
            f"{per_round}. CPU seconds over every process of a run (Ray's workers included): builds "
            f"{cpu['builds']:.0f}, sweep {cpu['sweep']:.0f}, `--promote 2` {cpu['promote_2']:.0f}. Load average at "
            f"the start of the runs {min(loads)} to {max(loads)}. Note recorded with the run: {d['note']}\n\n"
            + ("Here `--promote 2` took no less than the whole sweep: its screen and its second Tune phase (whose "
               "workers start and import torch and the stages again) cost about what the engines and audits it "
               "skips save on this small model.\n\n" if d["promote2_wall_s"] >= d["sweep_wall_s"] else "")
            + f"The sweep's choice: {choice}.\n")
    if d.get("figure"):
        text += f"\n![frontier of the {d['trials']}-trial sweep]({d['figure']})\n"
    return text


BLOCKS: dict[str, Callable[[Results], str]] = {
    "demo": demo, "method_saliency": method_saliency, "method_budgets": method_budgets,
    "method_distilled": method_distilled, "wanda_diagnosis": wanda_diagnosis, "prune_timing": prune_timing, "int8_ort": int8_ort,
    "export_checks": export_checks, "distill_digits": distill_digits, "build_e2e": build_e2e,
    "audit_imagefolder": audit_imagefolder, "digits_accuracy": digits_accuracy, "restore_timing": restore_timing,
    "permutation": permutation, "tome_ort_latency": tome_ort_latency, "test_suite": test_suite,
    "densify_backend": densify_backend, "prune_speed": prune_speed, "sweep_vs_builds": sweep_vs_builds,
}


def wrap(block: str, width: int = 105) -> str:
    """Prose lines wrapped like the rest of the README; table rows stay whole."""
    lines = []
    for line in block.splitlines():
        if line.startswith("|") or len(line) <= width:
            lines.append(line)
        else:
            indent = " " * (len(line) - len(line.lstrip(" -")))
            lines.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                       break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def render(text: str, results: Results | None = None) -> str:
    """text with every results block re-rendered; an unknown block name is an error."""
    results = results or Results()

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no renderer in benchmarks/render_readme.py")
        return match.group(1) + wrap(BLOCKS[name](results)) + match.group(4)

    return BLOCK.sub(fill, text)


def block_names(text: str) -> list[str]:
    return [m["name"] for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is not what the files render")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"{args.readme} differs from the results files: run python benchmarks/render_readme.py",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(fresh)
    print(f"rendered {len(block_names(text))} blocks into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

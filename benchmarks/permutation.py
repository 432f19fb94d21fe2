"""Channel-permutation search: saliency kept by N:M before/after, share of the gap recovered, time.

    python benchmarks/permutation.py [--patterns 2:4,4:8,8:16] [--seeds 5] [--seconds S]

Matrices (saliency = what the N:M mask keeps; generated with fixed seeds):
- random: |N(0,1)| entries (NVIDIA ASP's test matrices are 64x128 random);
- trained-like: |Student-t(3)| entries (heavy tails) times a per-column log-normal scale
  (exp(0.5 N(0,1))), the column-norm spread that real weights and Wanda saliency show.
Shapes 64x128, 768x768, 768x3072 (ViT-B fc1^T-shaped: K=3072), 3072x768.

Gap recovered = (kept_after - kept_before) / (kept_unstructured - kept_before), with unstructured =
the global per-matrix top-k at the same density (the json also gives the per-row top-k reference).
Timed on ONE intra-op thread (torch.set_num_threads(1)): wall seconds and process CPU seconds; the
machine's load average is recorded because the development machine is shared. The search runs with
its default fixed work (no time budget: deterministic) unless --seconds is given.
Writes benchmarks/results/permutation.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpdeploy.sparsity.permute import search as permute  # noqa: E402  (the search's constants live there)
from mpdeploy.sparsity.patterns import NM, parse_pattern  # noqa: E402
from mpdeploy.sparsity.permute.search import kept_saliency, search_permutation, unstructured_kept  # noqa: E402
from mpdeploy.core.machine import cpu_model  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((64, 128), (768, 768), (768, 3072), (3072, 768))
KINDS = ("random", "trained-like")


def make_matrix(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(rows, cols, generator=g).abs()
    # Student-t(3) via normal / sqrt(chi2/3), with a per-column scale spread.
    z = torch.randn(rows, cols, generator=g)
    chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(0)
    t = (z / (chi2 / 3).sqrt()).abs()
    return t * torch.exp(0.5 * torch.randn(cols, generator=g))


def per_row_kept(s: torch.Tensor, density: float) -> float:
    k = int(round(density * s.shape[1]))
    return float(s.double().topk(k, dim=1).values.sum())


def run_case(kind: str, shape: tuple[int, int], pattern: NM, seed: int, seconds: float | None) -> dict:
    s = make_matrix(kind, *shape, seed)
    total = float(s.double().sum())
    unstructured = unstructured_kept(s, pattern.density)
    row = per_row_kept(s, pattern.density)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    perm, before, after = search_permutation(s, pattern, seconds=seconds, seed=seed)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    assert abs(kept_saliency(s, pattern, perm) - after) <= 1e-6 * max(1.0, after)
    mode = "all-pairs" if shape[0] * shape[1] ** 2 <= permute.ALL_PAIRS_ELEMENTS else "matching rounds"
    return {
        "kind": kind, "rows": shape[0], "cols": shape[1], "pattern": str(pattern), "seed": seed, "mode": mode,
        "kept_before": before / total, "kept_after": after / total,
        "kept_unstructured": unstructured / total, "kept_per_row_topk": row / total,
        "gap_recovered": (after - before) / (unstructured - before),
        "gap_recovered_vs_per_row": (after - before) / (row - before),
        "seconds_wall": wall, "seconds_cpu": cpu,
    }


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def summarize(cases: list[dict]) -> list[dict]:
    keys = sorted({(c["kind"], c["rows"], c["cols"], c["pattern"]) for c in cases},
                  key=lambda k: (k[3], k[1] * k[2], k[1], k[0]))
    out = []
    for kind, rows, cols, pattern in keys:
        group = [c for c in cases if (c["kind"], c["rows"], c["cols"], c["pattern"]) == (kind, rows, cols, pattern)]
        out.append({
            "kind": kind, "shape": f"{rows}x{cols}", "pattern": pattern, "seeds": len(group), "mode": group[0]["mode"],
            **{k: mean(c[k] for c in group) for k in ("kept_before", "kept_after", "kept_unstructured",
                                                      "gap_recovered", "gap_recovered_vs_per_row",
                                                      "seconds_wall", "seconds_cpu")},
            "gap_recovered_min": min(c["gap_recovered"] for c in group),
            "seconds_wall_max": max(c["seconds_wall"] for c in group),
        })
    return out


def write_md(path: Path, summary: list[dict], machine: dict, seconds: float | None, prov: dict) -> None:
    git = prov["git"]
    commit = (git.get("commit") or "unknown")[:10] + (" + uncommitted changes" if git.get("dirty") else "")
    lines = [
        "# Channel-permutation search",
        "",
        f"`python benchmarks/permutation.py` at commit {commit} on {machine['cpu']} ({machine['cores']} cores, "
        f"1 torch thread), torch {machine['torch']}, {machine['date']}; load average at start "
        f"{machine['load_average']}, at end {machine['load_average_end']} (shared machine). "
        f"Search: {'default fixed work (deterministic)' if seconds is None else f'{seconds} s budget'}.",
        "",
        "Kept = share of the matrix's total saliency the N:M mask keeps. Gap = share of the gap between N:M "
        "and unstructured pruning at the same density (global per-matrix top-k) that the permutation recovers "
        "(mean over seeds; min in brackets). Time: wall / CPU seconds per matrix on one thread (mean).",
        "",
        "| matrix | shape | N:M | search | kept before | kept after | unstructured | gap recovered | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['kind']} | {r['shape']} | {r['pattern']} | {r['mode']} | {r['kept_before']:.4f} | "
            f"{r['kept_after']:.4f} | {r['kept_unstructured']:.4f} | {100 * r['gap_recovered']:.1f}% "
            f"({100 * r['gap_recovered_min']:.1f}%) | {r['seconds_wall']:.2f} | {r['seconds_cpu']:.2f} |"
        )
    lines += [
        "",
        "Reference: NVIDIA ASP's permutation search recovers about 35% of the gap on 64x128 random matrices "
        "(docs/method.md section 4).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", default="2:4,4:8,8:16")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for 64x128 (larger shapes: 1)")
    parser.add_argument("--seconds", type=float, default=None, help="time budget per matrix (default: fixed work)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="one 64x128 2:4 matrix, one seed (a test runs this)")
    parser.add_argument("--note", default="timed on one thread; the load average is recorded: wall seconds grow with "
                        "other work on the machine, CPU seconds much less; the kept/gap figures do not depend on it",
                        help="what else ran on the machine (goes into the JSON)")
    args = parser.parse_args(argv)
    shapes = SHAPES[:1] if args.smoke else SHAPES
    if args.smoke:
        args.patterns, args.seeds = "2:4", 1
    torch.set_num_threads(1)
    patterns = [parse_pattern(p) for p in args.patterns.split(",")]
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    prov = provenance.begin(__file__, argv)
    prov.model("matrices", None, "seeded random matrices generated by run_case (no model)")
    cases = []
    for pattern in patterns:
        for shape in shapes:
            for kind in KINDS:
                for seed in range(args.seeds if shape == (64, 128) else 1):
                    case = run_case(kind, shape, pattern, seed, args.seconds)
                    cases.append(case)
                    print(f"{kind:12s} {shape[0]}x{shape[1]:<5d} {pattern} seed {seed}: kept "
                          f"{case['kept_before']:.4f} -> {case['kept_after']:.4f} (unstructured "
                          f"{case['kept_unstructured']:.4f}), gap {100 * case['gap_recovered']:.1f}%, "
                          f"{case['seconds_wall']:.2f}s wall / {case['seconds_cpu']:.2f}s cpu", flush=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(cases)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "permutation",
        "command": shlex.join(["python", "benchmarks/permutation.py", *(argv if argv is not None else sys.argv[1:])]),
        "note": args.note,
        "search": {"seconds": args.seconds, "default_work": permute.DEFAULT_WORK,
                   "default_escapes": permute.DEFAULT_ESCAPES, "all_pairs_elements": permute.ALL_PAIRS_ELEMENTS},
        "unstructured_reference": permute.UNSTRUCTURED_KIND,
        "machine": machine,
        "summary": summary,
        "cases": cases,
    }
    record = provenance.write_results(args.out / "permutation.json", payload, prov)
    write_md(args.out / "permutation.md", summary, machine, args.seconds, record["provenance"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

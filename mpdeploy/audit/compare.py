"""Compare several audits side by side: one Markdown table and one comparison plot.

Each engine root contributes its audit (opened verified, with its chain) and the weights the audited
engine was built from, found through the recorded sources: pattern, budget, saliency, permutation /
restore / distillation, MAC reduction (a distilled artifact's prune config is its own source's). A `dense` row per
model carries the dense twin's numbers (the reference every sparse row is measured against).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.core import atomic
from mpdeploy.audit.common import AUDIT_DIR, pattern_text, runtime_text
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.figures import new_figure
from mpdeploy.core.kinds import AuditFolder, DistilledFolder, open_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    out: Path = Path("report.md")  # the PNG lands beside it, same stem
    plots: bool = True


def _weights_manifests(audit: AuditFolder) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the audited engine's weights manifest, the prune config behind it) via the recorded sources."""
    weights = audit.weights()  # verified with the audit's chain
    prune_conf = weights.config or {}
    if isinstance(weights, DistilledFolder):
        prune_conf = open_weights(weights.required_source("pruned"), verify=False).config or {}
    return weights.manifest, prune_conf


def _extras(pruned: Mapping[str, Any] | None, conf: Mapping[str, Any]) -> str:
    if not pruned:
        return ""
    tags = []
    if conf.get("permute"):
        tags.append("permute")
    if conf.get("restore"):
        tags.append("restore")
    if pruned.get("distill") or pruned.get("distillation"):
        tags.append("distilled")
    tome = pruned.get("tome")
    if tome:
        tags.append(f"ToMe r={tome.get('r') if isinstance(tome, dict) else tome}")
    return ", ".join(tags)


def collect(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per engine root: what was pruned how, and what the audit measured."""
    rows = []
    names = [Path(r).name for r in roots]
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise MpdeployError(f"engine folder not found: {root}; pass engines/<name> folders that were audited")
        if not (root / AUDIT_DIR / AuditFolder.RESULT).is_file():
            raise MpdeployError(f"{root} has no {AUDIT_DIR}/{AuditFolder.RESULT}; run mpdeploy audit {root} first")
        audit = AuditFolder.open(root / AUDIT_DIR)
        a = audit.result()
        pruned, conf = _weights_manifests(audit)
        s = a.get("summary") or {}
        totals = (pruned or {}).get("totals") or {}
        label = root.name if names.count(root.name) == 1 else f"{root.parent.name}/{root.name}"
        rows.append({
            "label": label,
            "path": str(root),
            "model": ((pruned or {}).get("model") or {}).get("name") or s.get("model") or root.name,
            "pattern": pattern_text((pruned or {}).get("layers") or []) if pruned else s.get("pattern"),
            "budget": conf.get("budget", s.get("budget")),
            "saliency": conf.get("saliency", s.get("saliency")),
            "extras": _extras(pruned, conf),
            "mac_reduction": totals.get("mac_reduction", s.get("mac_reduction")),
            "sparse_execution_mac_reduction": totals.get("sparse_execution_mac_reduction",
                                                         s.get("sparse_execution_mac_reduction")),
            "top1_dense": s.get("top1_dense"),
            "top1_sparse": s.get("top1_sparse"),
            "top1_drop": s.get("top1_drop"),
            "agreement": s.get("agreement"),
            "certified": s.get("certified_fraction"),
            "speedup": {str(k): v for k, v in (s.get("speedup_p50") or {}).items()},
            "passed": a.get("passed"),
            "backend": a.get("backend"),
            "runtime": runtime_text(a.get("backend") or "?", (a.get("device") or {}).get("runtime") or {},
                                     (a.get("device") or {}).get("host") or {}),
            "data": (a.get("data") or {}).get("description"),
        })
    return rows


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _report_link(root: str, out_dir: Path) -> str:
    """The engine root's audit report, relative to the folder the comparison is written into."""
    report = Path(root).resolve() / AUDIT_DIR / AuditFolder.MARKDOWN
    return Path(os.path.relpath(report, out_dir.resolve())).as_posix()


def render(rows: Sequence[Mapping[str, Any]], png_name: str | None, out_dir: Path = Path(".")) -> str:
    batches = sorted({b for r in rows for b in r["speedup"]}, key=int)
    head = ["engine", "model", "pattern", "budget", "saliency", "extras", "MAC red.", "sparse-exec MAC red.",
            "top-1", "top-1 vs dense", "agreement", "certified", *[f"speedup b{b}" for b in batches], "backend", "audit"]
    lines = ["# Audit comparison", "",
             f"{len(rows)} audited engines. Speedup = dense p50 / sparse p50 of each engine's own dense twin, "
             "measured in the same run (>1: sparse faster). Top-1 is against labels only where they fit the "
             "model; agreement and certified fraction compare each sparse engine with its dense twin.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    seen_dense = set()
    for r in rows:
        key = (r["model"], r["top1_dense"], r["data"])
        if key not in seen_dense:
            seen_dense.add(key)
            cells = ["dense (twin)", r["model"], "dense", "", "", "", "0.0%", "0.0%", _pct(r["top1_dense"], 2),
                     "", "100%", "100%", *["1.00x" for _ in batches], r["backend"] or "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        drop = "n/a" if r["top1_drop"] is None else f"{-100 * r['top1_drop']:+.2f} pts"
        cells = [f"`{r['label']}`", r["model"], r["pattern"] or "", r["budget"] or "", r["saliency"] or "",
                 r["extras"], _pct(r["mac_reduction"]), _pct(r["sparse_execution_mac_reduction"]),
                 _pct(r["top1_sparse"], 2), drop, _pct(r["agreement"], 2), _pct(r["certified"]),
                 *[("n/a" if r["speedup"].get(b) is None else f"{r['speedup'][b]:.2f}x") for b in batches],
                 r["backend"] or "", "PASS" if r["passed"] else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    runtimes = sorted({r["runtime"] for r in rows})
    if len(runtimes) > 1:
        lines += ["Speedups were measured on different runtimes; compare them only within one:", ""]
        lines += [f"- {t}: " + ", ".join(f"`{r['label']}`" for r in rows if r["runtime"] == t) for t in runtimes]
    else:
        lines.append(f"All measured on {runtimes[0]}.")
    lines.append("")
    links = [f"[{r['label']}]({_report_link(r['path'], out_dir)})" for r in rows]
    lines += ["Per-engine reports: " + ", ".join(links), ""]
    if png_name:
        lines += [f"![comparison]({png_name})", ""]
    return "\n".join(lines)


def _plot(rows: Sequence[Mapping[str, Any]], target) -> None:
    fig = new_figure(11, 4.6, left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.28)
    left, right = fig.subplots(1, 2)
    use_top1 = all(r["top1_sparse"] is not None for r in rows)
    metric = "top1_sparse" if use_top1 else "agreement"
    for i, r in enumerate(rows):
        x = 100 * (r["mac_reduction"] or 0.0)
        y = 100 * (r[metric] or 0.0)
        left.scatter([x], [y], s=40, color=f"C{i % 10}", marker="o" if r["passed"] else "x")
        left.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4 - 10 * (i % 3)), fontsize=8)
    if use_top1:
        for model, dense in {(r["model"], r["top1_dense"]) for r in rows}:
            left.axhline(100 * dense, color="gray", ls="--", lw=1)
            left.annotate(f"dense {model}", (0, 100 * dense), textcoords="offset points", xytext=(2, 3),
                          fontsize=8, color="gray")
    left.set_xlabel("MAC reduction (%)")
    left.set_ylabel("sparse top-1 (%)" if use_top1 else "agreement with dense (%)")
    left.set_title("accuracy vs MACs removed (x: failed audit)", fontsize=10)
    left.grid(alpha=0.3)
    batches = sorted({b for r in rows for b in r["speedup"]}, key=int)
    width = 0.8 / max(len(rows), 1)
    xs = np.arange(len(batches))
    for i, r in enumerate(rows):
        vals = [r["speedup"].get(b, np.nan) for b in batches]
        right.bar(xs + (i - (len(rows) - 1) / 2) * width, vals, width, color=f"C{i % 10}", label=r["label"])
    right.axhline(1.0, color="black", lw=1, ls="--")
    right.set_xticks(xs, [f"batch {b}" for b in batches])
    right.set_ylabel("speedup (dense p50 / sparse p50)")
    right.set_title("speedup per batch size", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    right.grid(axis="y", alpha=0.3)
    fig.savefig(target, format="png")


def report(engine_roots: Sequence[Path], config: ReportConfig) -> Path:
    """Write the comparison Markdown (and PNG beside it); returns the Markdown path."""
    if not engine_roots:
        raise MpdeployError("pass at least one audited engine folder, e.g. mpdeploy report engines/a engines/b")
    rows = collect([Path(r) for r in engine_roots])
    out = Path(config.out)
    if out.is_dir():
        raise MpdeployError(f"--out {out} is a folder; give a file name such as {out / 'report.md'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MpdeployError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MpdeployError(atomic.os_error_message(exc, out) or f"cannot create {out.parent} ({exc.strerror}); "
                            "choose another --out") from None
    png = out.with_suffix(".png") if config.plots else None
    if png is not None:
        import io

        buffer = io.BytesIO()
        _plot(rows, buffer)
        atomic.atomic_write_bytes(png, buffer.getvalue())
    atomic.atomic_write_text(out, render(rows, png.name if png else None, out.parent))
    logger.info("compared %d audits -> %s", len(rows), out)
    return out

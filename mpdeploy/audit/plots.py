"""The audit's PNG plots."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.core.figures import new_figure
from mpdeploy.core.kinds import AuditFolder

from mpdeploy.audit.common import runtime_text
from mpdeploy.audit.metrics import dense_margins, logit_distance

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# plots


SCATTER_POINTS = 10_000


def write_plots(result: Mapping[str, Any], samples: Mapping[str, np.ndarray] | None, folder: Path) -> list[str]:
    """The PNGs; `samples` holds per image the dense "margin" and the logit "distance" (or, for callers
    that still have them, the full "dense" and "sparse" logits)."""
    written = []
    if samples is not None and "dense" in samples:
        samples = ({"margin": dense_margins(samples["dense"]),
                    "distance": logit_distance(samples["dense"], samples["sparse"])}
                   if samples["dense"].shape[1] >= 2 else None)
    plots = AuditFolder.PLOTS
    if result["latency"]:
        _plot_latency(result, folder / plots["latency"])
        written.append(plots["latency"])
    if result["accuracy"] is not None:
        _plot_accuracy(result, folder / plots["accuracy"])
        written.append(plots["accuracy"])
        if samples is not None and len(samples["margin"]) and np.isfinite(samples["margin"]).all():
            _plot_certified(samples, folder / plots["certified"])
            written.append(plots["certified"])
    if result["sensitivity"]:
        _plot_sensitivity(result, folder / plots["sensitivity"])
        written.append(plots["sensitivity"])
    return written


def _plot_latency(result: Mapping[str, Any], path: Path) -> None:
    lat = result["latency"]
    batches = list(lat)
    xs = np.arange(len(batches))
    fig = new_figure(10, 4.2, left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.25)
    left, right = fig.subplots(1, 2)
    width = 0.38
    for offset, name, color in ((-width / 2, "dense", "tab:gray"), (width / 2, "sparse", "tab:blue")):
        p50 = np.array([lat[b][name]["p50"] for b in batches])
        lo = p50 - np.array([lat[b][name]["p10"] for b in batches])
        hi = np.array([lat[b][name]["p90"] for b in batches]) - p50
        left.bar(xs + offset, p50, width, color=color, label=f"{name} p50", yerr=[lo, hi], capsize=4)
    left.set_xticks(xs, [f"batch {b}" for b in batches])
    left.set_ylabel("ms per call (p50, bars: p10-p90)")
    left.set_yscale("log")
    left.set_title("latency per call")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3, which="both")
    med = np.array([lat[b]["ratio_p50"] for b in batches])
    p10 = np.array([lat[b]["ratio_spread"]["p10"] for b in batches])
    p90 = np.array([lat[b]["ratio_spread"]["p90"] for b in batches])
    right.errorbar(xs, med, yerr=[np.maximum(med - p10, 0), np.maximum(p90 - med, 0)], fmt="o", color="tab:blue",
                   capsize=5, label="dense p50 / sparse p50 (bars: p10-p90 of rounds)")
    for i, v in enumerate(med):
        right.annotate(f"{v:.2f}x", (xs[i], v), textcoords="offset points", xytext=(8, 4), fontsize=9)
    right.axhline(1.0, color="black", lw=1, ls="--", label="no speedup")
    gate = result["thresholds"]["min_speedup"]
    if gate is not None:
        right.axhline(gate, color="tab:red", lw=1, ls=":", label=f"gate {gate:g}x")
    right.set_xticks(xs, [f"batch {b}" for b in batches])
    right.set_xlim(-0.5, len(batches) - 0.5)
    right.set_ylabel("speedup (>1: sparse faster)")
    right.set_title("sparse speedup")
    right.legend(fontsize=8, loc="best")
    right.grid(axis="y", alpha=0.3)
    dev = runtime_text(result["backend"], result["device"]["runtime"], result["device"]["host"])
    fig.suptitle(f"{result['summary']['model']}: dense vs sparse on {dev}", fontsize=10)
    fig.savefig(path)


def _plot_accuracy(result: Mapping[str, Any], path: Path) -> None:
    acc = result["accuracy"]
    fig = new_figure(8, 4.2, left=0.09, right=0.98, bottom=0.14, top=0.88)
    ax = fig.add_subplot()
    names, dense, sparse = [], [], []
    for k in (1, 5):
        if acc.get(f"top{k}_dense") is not None:
            names.append(f"top-{k}")
            dense.append(100 * acc[f"top{k}_dense"])
            sparse.append(100 * acc[f"top{k}_sparse"])
    xs = np.arange(len(names))
    if names:
        ax.bar(xs - 0.19, dense, 0.38, color="tab:gray", label="dense engine")
        ax.bar(xs + 0.19, sparse, 0.38, color="tab:blue", label="sparse engine")
        for x, d, s in zip(xs, dense, sparse):
            ax.annotate(f"{d:.1f}%", (x - 0.19, d), ha="center", va="bottom", fontsize=8)
            ax.annotate(f"{s:.1f}%", (x + 0.19, s), ha="center", va="bottom", fontsize=8)
    extra = [("agreement\nwith dense", 100 * acc["agreement"], "tab:green"),
             ("certified\n(m > 2d)", 100 * acc["certified_fraction"], "tab:olive")]
    for i, (label, value, color) in enumerate(extra):
        x = len(names) + i
        ax.bar(x, value, 0.5, color=color)
        ax.annotate(f"{value:.1f}%", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(names) + len(extra)), names + [e[0] for e in extra])
    ax.set_xlim(-0.7, len(names) + len(extra) - 0.3)
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of evaluation images")
    note = "" if acc.get("labels_meaningful") else "\nlabels do not fit the model: no top-k, agreement is the gate"
    ax.set_title(f"accuracy on {acc['images']} {result['data']['kind']} images{note}", fontsize=10)
    if names:
        ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _log_axis_labels(axis) -> None:
    """Major ticks only: minor-tick labels of log axes collide."""
    from matplotlib.ticker import NullFormatter

    axis.set_minor_formatter(NullFormatter())


def _plot_certified(samples: Mapping[str, np.ndarray], path: Path) -> None:
    margins = np.asarray(samples["margin"], np.float64)
    two_d = 2 * np.asarray(samples["distance"], np.float64)
    floor = 1e-6
    m, t = np.maximum(margins, floor), np.maximum(two_d, floor)
    certified = margins > two_d
    fig = new_figure(10, 4.2, left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.25)
    left, right = fig.subplots(1, 2)
    lo = min(m.min(), t.min())
    hi = max(m.max(), t.max())
    bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 40)
    left.hist(m, bins=bins, color="tab:gray", alpha=0.7, label="dense margin m = z1 - z2")
    left.hist(t, bins=bins, color="tab:red", alpha=0.6, label="2d = 2 ||z_sparse - z_dense||_inf")
    left.set_xscale("log")
    _log_axis_labels(left.xaxis)
    left.set_xlabel(f"logit units (log scale; values below {floor:g} shown at {floor:g})")
    left.set_ylabel("images")
    left.legend(fontsize=8)
    left.set_title("margins vs perturbations")
    # A scatter of 50,000 points says no more than 10,000 and costs seconds: plot a seeded subset.
    shown = np.zeros(len(m), bool)
    shown[np.random.default_rng(0).permutation(len(m))[:SCATTER_POINTS]] = True
    right.scatter(m[certified & shown], t[certified & shown], s=8, color="tab:green",
                  label=f"certified ({certified.sum()})")
    right.scatter(m[~certified & shown], t[~certified & shown], s=12, color="tab:red", marker="x",
                  label=f"not certified ({(~certified).sum()})")
    line = np.array([lo, hi])
    right.plot(line, line, color="black", lw=1, ls="--", label="m = 2d")
    right.set_xscale("log")
    right.set_yscale("log")
    _log_axis_labels(right.xaxis)
    _log_axis_labels(right.yaxis)
    right.set_xlabel("dense margin m")
    right.set_ylabel("2d")
    right.legend(fontsize=8, loc="best")
    right.set_title("per image: certified when below the line")
    fig.suptitle(f"certified fraction {certified.mean():.1%}: sparse top-1 provably equals dense top-1", fontsize=10)
    fig.savefig(path)


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-4:]) if len(parts) > 4 else name


def _plot_sensitivity(result: Mapping[str, Any], path: Path) -> None:
    recs = result["sensitivity"]
    fig = new_figure(9, 5, left=0.12, right=0.98, bottom=0.11, top=0.9)
    ax = fig.add_subplot()
    with_signal = [r for r in recs if r["signal"] is not None]
    positive = [r["logit_effect"] for r in with_signal if r["logit_effect"] > 0]
    # Exactly-zero effects (a layer whose output is multiplied by zero downstream) sit on a floor
    # one decade below the smallest real effect instead of stretching the log axis.
    floor = min(positive) / 10 if positive else 1e-6
    patterns = sorted({r["pattern"] for r in with_signal})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for i, p in enumerate(patterns):
        pts = [r for r in with_signal if r["pattern"] == p]
        nonzero = [r for r in pts if r["logit_effect"] > 0]
        zero = [r for r in pts if r["logit_effect"] <= 0]
        ax.scatter([r["signal"] for r in nonzero], [r["logit_effect"] for r in nonzero], s=28,
                   color=colors[i % len(colors)], label=f"{p} ({len(pts)} layers)")
        if zero:
            ax.scatter([r["signal"] for r in zero], [floor] * len(zero), s=28, marker="v",
                       color=colors[i % len(colors)], label=f"{p}: effect exactly 0 ({len(zero)}), drawn at floor")
    # Label the outliers: the largest effects and the points furthest from a log-linear trend.
    if positive:
        pts = [r for r in with_signal if r["logit_effect"] > 0]
        sig = np.array([r["signal"] for r in pts])
        eff = np.log10([r["logit_effect"] for r in pts])
        resid = eff - np.polyval(np.polyfit(sig, eff, 1), sig) if len(sig) >= 3 and np.ptp(sig) > 0 else eff
        picks = list(dict.fromkeys([*np.argsort(-eff)[:3], *np.argsort(-np.abs(resid))[:2]]))
        for j, i in enumerate(picks):
            r = pts[i]
            ax.annotate(_short(r["layer"]), (r["signal"], r["logit_effect"]), fontsize=8,
                        textcoords="offset points", xytext=(6, 6 - 9 * (j % 3)),
                        arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.5})
    ax.set_yscale("log")
    ax.set_xlabel("MP signal: bulk fraction of the layer's weight (higher = more noise-like = safer to prune)")
    ax.set_ylabel("logit effect of this layer alone\nmean ||z - z_dense||_inf")
    sens = result["sensitivity_summary"]
    rho = sens.get("spearman_signal_vs_effect")
    rho_text = "n/a" if rho is None else f"{rho:+.2f}"
    ax.set_title(f"per-layer sensitivity on {sens['images']} images; Spearman(signal, effect) = {rho_text}; "
                 f"all layers together {sens['all_layers']['logit_effect']:.3g}", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    if with_signal:
        ax.legend(fontsize=8, loc="best")
    else:  # small models: every matrix is under the MP fit's size floor, so no layer has a signal to plot
        ax.text(0.5, 0.5, f"no pruned layer carries an MP signal ({len(recs)} layers measured; matrices under\n"
                f"64 rows or columns get none): see the sensitivity table in {AuditFolder.MARKDOWN}",
                transform=ax.transAxes, ha="center", va="center", fontsize=10)
    fig.savefig(path)

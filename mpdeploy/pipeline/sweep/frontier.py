"""frontier.png: top-1 against the objective, the Pareto front, the accuracy constraint, the choice marked;
one marker shape per GPU kind."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpdeploy.core.figures import new_figure
from mpdeploy.pipeline.sweep.choice import accuracy_drop, kind_of, objective_value
from mpdeploy.pipeline.sweep.space import Objective

logger = logging.getLogger(__name__)

MARKERS = "osD^vP*X<>"


def plot_frontier(rows: Sequence[Mapping[str, Any]], choices: Mapping[str, str | None], front: Sequence[str],
                  objective: Objective, max_drop: float, path: Path) -> bool:
    """Write the figure; False (no file) when no trial has both numbers to plot."""
    points = []
    for r in rows:
        value = objective_value(r, objective, "dense" if r.get("baseline") else "sparse")
        if r.get("status") == "ok" and value is not None and isinstance(r.get("top1_sparse"), (int, float)):
            points.append((r, value, 100.0 * r["top1_sparse"]))
    if not points:
        return False
    fig = new_figure(7.5, 4.8, left=0.1, right=0.74, bottom=0.12, top=0.92)
    ax = fig.add_subplot(1, 1, 1)
    kinds = sorted({kind_of(r) for r, _, _ in points})
    for i, kind in enumerate(kinds):
        mine = [(r, x, y) for r, x, y in points if kind_of(r) == kind]
        marker = MARKERS[i % len(MARKERS)]
        within = [(x, y) for r, x, y in mine if (accuracy_drop(r) or 0.0) <= max_drop + 1e-12 and not r.get("baseline")]
        over = [(x, y) for r, x, y in mine if (accuracy_drop(r) or 0.0) > max_drop + 1e-12]
        if within:
            ax.scatter(*zip(*within), marker=marker, color="tab:blue", label=f"{kind}: within budget", zorder=3)
        if over:
            ax.scatter(*zip(*over), marker=marker, color="tab:gray", alpha=0.6, label=f"{kind}: over budget", zorder=3)
        for r, x, y in mine:
            if r.get("baseline"):
                ax.scatter([x], [y], marker=marker, facecolors="none", edgecolors="black", s=90,
                           label=f"{kind}: dense baseline", zorder=4)
                dense_top1 = y
                ax.axhline(dense_top1 - 100.0 * max_drop, color="tab:red", ls="--", lw=1,
                           label=f"{kind}: constraint (drop {max_drop:.1%})" if len(kinds) > 1 else
                           f"constraint (drop <= {max_drop:.1%})")
        on_front = sorted((x, y) for r, x, y in mine if r["id"] in front)
        if len(on_front) > 1:
            ax.plot(*zip(*on_front), color="tab:orange", lw=1.2, drawstyle="steps-post", zorder=2,
                    label=f"{kind}: Pareto front")
        chosen = [(x, y) for r, x, y in mine if r["id"] == choices.get(kind)]
        if chosen:
            ax.scatter(*zip(*chosen), marker="*", s=260, color="gold", edgecolors="black", zorder=5,
                       label=f"{kind}: choice")
        for r, x, y in mine:
            if not r.get("baseline"):
                ax.annotate(r["id"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{objective.label} of the engine ({objective.unit}; "
                  f"{'higher' if objective.mode == 'max' else 'lower'} is better)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy against speed: every trial of the sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path)
    return True

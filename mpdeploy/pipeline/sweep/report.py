"""The `sweep/` artifact: sweep.json (a row per trial), sweep.md (the table and the choice), frontier.png.

Its manifest records every audit (and screen) the rows were read from as a source, so opening the sweep
verifies the whole chain behind every number, and `chosen_audit` hands `mpdeploy ship` the audit of the
choice only after that check.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import SweepFolder
from mpdeploy.pipeline.sweep.choice import accuracy_drop, kind_of, objective_value
from mpdeploy.pipeline.sweep.space import Objective, describe

logger = logging.getLogger(__name__)

KIND = "sweep"
SCHEMA = "mpdeploy.sweep/1"
FOLDER = "sweep"


def _source_roles(rows: Sequence[Mapping[str, Any]], root: Path) -> dict[str, Path]:
    sources = {}
    for r in rows:
        folders = r.get("folders") or {}
        for step in ("audit", "screen"):
            if r.get("status") in ("ok", "not promoted") and folders.get(step):
                sources[f"{step}:{r['id']}"] = root / folders[step]
    return sources


def write_sweep(root: Path, rows: list[dict[str, Any]], choices: Mapping[str, str | None], front: Sequence[str],
                objective: Objective, max_drop: float, config: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Write `<root>/sweep/` atomically; returns its path."""
    from mpdeploy.pipeline.sweep.frontier import plot_frontier

    target = Path(root) / FOLDER
    record = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "objective": objective.label, "objective_unit": objective.unit, "objective_mode": objective.mode,
              "max_top1_drop": max_drop, "choice": dict(choices), "pareto_front": list(front), **dict(info),
              "rows": rows}
    sources = _source_roles(rows, Path(root))
    with artifacts.atomic_dir(target, kind=KIND) as tmp:
        artifacts.write_json(tmp / SweepFolder.TABLE, record)
        plotted = plot_frontier(rows, choices, front, objective, max_drop, tmp / SweepFolder.FRONTIER)
        (tmp / SweepFolder.MARKDOWN).write_text(render_markdown(record, plotted))
        artifacts.write_manifest(tmp, KIND, config, sources=sources, target=target,
                                 extra={"choice": dict(choices), "objective": objective.label})
    return target


def _pct(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "-"


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"


def _speedup(row: Mapping[str, Any], batch: int) -> str:
    rec = (row.get("latency") or {}).get(str(batch)) or {}
    ci = rec.get("speedup_ci95") or [None, None]
    if not isinstance(rec.get("speedup"), (int, float)):
        return "-"
    if all(isinstance(c, (int, float)) for c in ci):
        return f"{rec['speedup']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{rec['speedup']:.3f}"


def render_markdown(record: Mapping[str, Any], plotted: bool) -> str:
    objective = Objective(record["objective"].split("@")[0], int(record["objective"].split("@b")[1]))
    rows = record["rows"]
    lines = [f"# Sweep: {record.get('model', '')}", ""]
    for kind, choice in record["choice"].items():
        chosen = next((r for r in rows if r["id"] == choice), None)
        if chosen is None:
            lines.append(f"- **{kind}**: no trial met the constraint (top-1 drop <= {record['max_top1_drop']:.2%})")
        else:
            value = objective_value(chosen, objective, "dense" if chosen.get("baseline") else "sparse")
            lines.append(f"- **{kind}**: choice **{choice}** ({describe(chosen['config'])}): {objective.label} "
                         f"{_num(value)} {objective.unit}, top-1 drop {_pct(accuracy_drop(chosen))}; "
                         f"{chosen.get('verdict', '')}")
    lines += ["", f"Objective {objective.label} ({objective.mode}), constraint: top-1 drop <= "
              f"{record['max_top1_drop']:.2%}. Trials: {len(rows)}; backend {record.get('backend')}; "
              f"{record.get('seconds', 0):.1f} s.", ""]
    if plotted:
        lines += [f"![frontier]({SweepFolder.FRONTIER})", ""]
    kinds = sorted({kind_of(r) for r in rows})
    for kind in kinds:
        if len(kinds) > 1:
            lines += [f"## GPU kind {kind}", ""]
        lines += [f"| trial | config | status | top-1 sparse | top-1 dense | drop | agreement | MAC cut | "
                  f"{objective.label} ({objective.unit}) | speedup b{objective.batch} [95% CI] | front | node | s | why |",
                  "|" + "---|" * 14]
        for r in (r for r in rows if kind_of(r) == kind):
            node = ((r.get("node") or {}).get("engine_steps") or (r.get("node") or {}).get("cpu_steps") or {})
            value = objective_value(r, objective, "dense" if r.get("baseline") else "sparse")
            lines.append(" | ".join([
                f"| {r['id']}", describe(r.get("config") or {}), r.get("status", ""), _pct(r.get("top1_sparse")),
                _pct(r.get("top1_dense")), _pct(accuracy_drop(r)), _pct(r.get("agreement")), _pct(r.get("mac_cut")),
                _num(value), _speedup(r, objective.batch), "yes" if r["id"] in record["pareto_front"] else "",
                str(node.get("ip") or node.get("host") or "-"), _num(r.get("seconds")),
                str(r.get("verdict", "")).replace("|", "/") + " |"]))
        lines.append("")
    lines += ["Speedup = dense p50 / sparse p50 of the same audit (interleaved timing), with its 95% interval; an "
              "interval holding 1.0 is no measurable difference. Absolute latencies of different trials were timed at "
              f"different moments: the load of the machine is in each row of {SweepFolder.TABLE}.", ""]
    return "\n".join(lines)


def open_sweep(path: Path | str) -> dict[str, Any]:
    """sweep.json of a verified sweep folder (its files, and every audit and screen it was read from)."""
    path = Path(path)
    manifest = artifacts.read_manifest(path, KIND, verify=True)
    if SweepFolder.TABLE not in (manifest.get("files") or {}):
        raise MpdeployError(f"{path}: its manifest lists no {SweepFolder.TABLE}; run mpdeploy sweep again")
    data = artifacts.read_json(path / SweepFolder.TABLE, what="sweep")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise MpdeployError(f"{path}/{SweepFolder.TABLE} is not a {SCHEMA} record; run mpdeploy sweep again")
    return data


def is_sweep_folder(path: Path | str) -> bool:
    """Whether `path` holds a sweep artifact (by its manifest's kind; verified later by `chosen_audit`)."""
    manifest = Path(path) / artifacts.MANIFEST
    if not manifest.is_file():
        return False
    try:
        return artifacts.read_json(manifest, what="manifest").get("kind") == KIND
    except (MpdeployError, AttributeError):
        return False


def chosen_audit(sweep_dir: Path | str, kind: str | None = None) -> Path:
    """The audit folder of the sweep's choice (for `mpdeploy ship SWEEP_DIR`), verified; one line otherwise."""
    sweep_dir = Path(sweep_dir)
    data = open_sweep(sweep_dir)
    choices = data.get("choice") or {}
    if kind is None:
        if len(choices) != 1:
            raise MpdeployError(f"{sweep_dir} chose one engine per GPU kind ({', '.join(choices)}); name the kind to ship")
        kind = next(iter(choices))
    if kind not in choices:
        raise MpdeployError(f"{sweep_dir} has no GPU kind {kind!r}; it has {', '.join(choices)}")
    choice = choices[kind]
    if choice is None:
        raise MpdeployError(f"{sweep_dir}: no trial met the accuracy constraint on {kind}; nothing to ship")
    row = next(r for r in data["rows"] if r["id"] == choice)
    if row.get("baseline"):
        raise MpdeployError(f"{sweep_dir}: the choice on {kind} is the dense baseline (no sparse trial beat it); "
                            "ship a dense build instead")
    from mpdeploy.core.kinds import AuditFolder

    source = artifacts.read_manifest(sweep_dir, KIND, verify=False)["sources"].get(f"audit:{choice}")
    if source is None:
        raise MpdeployError(f"{sweep_dir}: its manifest records no audit of {choice}; run mpdeploy sweep again")
    audit = AuditFolder.open(sweep_dir / source["path"])  # verified with the engine and weights behind it
    return audit.path.resolve()

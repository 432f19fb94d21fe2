"""`mpdeploy build [MODEL] --sparse [--backend auto|trt|torch|ort] [--precision ...] [--out engines/NAME]`.

prune [-> distill] -> export -> engines (sparse engine + dense twin) -> audit (on --eval-data, with the
audit's options and gates). With no MODEL, the embedded default
`zoo:digits_vit` (trained on scikit-learn's digits on first use). Finished stages are reused on a re-run
with the same inputs; --force rebuilds them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mpdeploy.commands.arguments import (
    DATA_SOURCES,
    LABELLED_SOURCES,
    add_audit_options,
    add_engine_options,
    add_model_arguments,
    audit_config_from_args,
    build_config_from_args,
)
from mpdeploy.commands.prune import add_prune_arguments
from mpdeploy.core.kinds import AuditFolder
from mpdeploy.core.names import BACKENDS

if TYPE_CHECKING:  # the configs' modules import torch: not at `mpdeploy --help`
    from mpdeploy.audit.config import AuditConfig
    from mpdeploy.backends.base import BuildConfig
    from mpdeploy.distill.config import DistillConfig
    from mpdeploy.export.stage import ExportConfig
    from mpdeploy.pipeline.build import BuildStageConfig
    from mpdeploy.prune.stage import PruneConfig

DEFAULT_MODEL = "zoo:digits_vit"
# With no MODEL the demo runs the whole method on the default: the calibrated default saliency (auto) on digits, then
# 3 epochs of distillation (the paper's recovery), so the audit shows what a real deployment sees.
DEFAULT_CALIB = "digits"
DEFAULT_DISTILL_EPOCHS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    add_prune_arguments(parser)
    g = parser.add_argument_group("build")
    g.add_argument("--sparse", action="store_true",
                   help="build the sparse engine and its dense twin (without it: only the dense engine)")
    g.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto = the first usable of trt > torch > ort (default: auto)")
    add_engine_options(g)
    g.add_argument("--out", type=Path, default=None, help="engine folder (default: engines/<model name>)")
    g.add_argument("--name", default=None, help="engine folder name under engines/ (default: the model's name)")
    g.add_argument("--force", action="store_true", help="rebuild every stage even if a finished one matches")
    g.add_argument("--no-audit", action="store_true", help="stop after the build stage")
    g.add_argument("--no-densify", action="store_true",
                   help="with --sparse on trt / torch: do not give the layers the engine ran dense their dense "
                        "weights back (by default once: densify, rebuild, audit, into <out>/densified/)")
    g.add_argument("--slow-layers", type=Path, default=None,
                   help="file of layers whose sparse kernel timed slower than dense on the GPU: densify gives them "
                        "back too (JSON list or one name per line)")
    a = parser.add_argument_group("audit")
    a.add_argument("--eval-data", default="digits",
                   help=f"the audit's evaluation images: {DATA_SOURCES} (default: digits)")
    add_audit_options(a)
    d = parser.add_argument_group("distillation")
    d.add_argument("--distill-epochs", type=int, default=None,
                   help="short recovery after pruning: distill the dense twin into the pruned model for N epochs "
                        f"(default: 0; {DEFAULT_DISTILL_EPOCHS} for the embedded default model)")
    d.add_argument("--distill-data", default=None,
                   help=f"labelled training data for distillation: {LABELLED_SOURCES} (default: digits)")
    e = parser.add_argument_group("export")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    e.add_argument("--allow-ineligible", action="store_true",
                   help="export even if pruned layers are not 2:4-eligible for TensorRT in the ONNX")


@dataclass(frozen=True)
class BuildConfigs:
    """What `mpdeploy build` runs with: one config per stage, from the flags."""

    prune: PruneConfig
    export: ExportConfig
    build: BuildConfig  # the engines'
    stage: BuildStageConfig  # which backend, where, what to run
    distill: DistillConfig | None  # None: no recovery
    audit: AuditConfig | None  # None: --no-audit


def configs_from_args(args: argparse.Namespace) -> BuildConfigs:
    """The configs of every stage; validates every flag before anything heavy runs."""
    from mpdeploy.pipeline.build import BuildStageConfig
    from mpdeploy.commands.prune import prune_config_from_args
    from mpdeploy.export.stage import ExportConfig

    if args.model is None and args.calib is None:
        args.calib = DEFAULT_CALIB
    prune_config = prune_config_from_args(args)
    if args.slow_layers is not None:
        from mpdeploy.densify.evidence import read_slow_layers

        read_slow_layers(args.slow_layers)  # a bad file fails now, not after the first engine is built
    export_config = ExportConfig(opset=args.opset, exporter=args.exporter, allow_ineligible=args.allow_ineligible)
    build_config = build_config_from_args(args, calib=args.calib)
    audit_config = None if args.no_audit else audit_config_from_args(args, args.eval_data, None, args.batch_sizes)
    stage = BuildStageConfig(backend=args.backend, sparse=args.sparse, name=args.name, out=args.out,
                             force=args.force, audit=not args.no_audit, densify=not args.no_densify,
                             slow_layers=args.slow_layers)
    epochs = args.distill_epochs
    if epochs is None:
        epochs = DEFAULT_DISTILL_EPOCHS if args.model is None else 0
    if epochs < 0:
        from mpdeploy.core.errors import MpdeployError

        raise MpdeployError(f"--distill-epochs must be 0 or more, got {epochs}")
    distill_config = None
    if epochs:
        from mpdeploy.distill.config import DistillConfig

        # The audit's labelled images score the distillation too (digits: its test split, the default).
        eval_data = args.eval_data if args.eval_data not in ("digits", "synthetic") else None
        distill_config = DistillConfig(data=args.distill_data or "digits", epochs=epochs, eval_data=eval_data)
    return BuildConfigs(prune=prune_config, export=export_config, build=build_config, stage=stage,
                        distill=distill_config, audit=audit_config)


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB" if isinstance(n, (int, float)) else "-"


def _densify_numbers(d) -> str:
    """Layers given back; top-1 and speed before -> after; whether other layers' sparse use changed."""
    if "reason" in d:
        return d["reason"]
    parts = [f"{len(d.get('returned') or {})} layers dense again, {len(d.get('ran_sparse') or [])} still sparse"]
    ba = d.get("before_after") or {}

    def arrow(key: str, fmt: str) -> str | None:
        a, b = ba.get(key) or [None, None]
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return f"{fmt.format(a)} -> {fmt.format(b)}" if numbers else None

    top1 = arrow("top1_sparse", "{:.4f}")
    if top1:
        parts.append(f"top1_sparse {top1}")
    speed = arrow("speedup_p50_largest_batch", "{:.2f}")
    if speed:
        parts.append(f"dense/sparse p50 b{(ba.get('largest_batch') or [None])[-1]}: {speed}")
    check = d.get("check")
    if check and check.get("unchanged") is None:
        parts.append(f"sparse use after the rebuild not checked: {check.get('error')}")
    elif check:
        parts.append("other layers' sparse use unchanged" if check.get("unchanged") else
                     f"CHANGED sparse use: no longer sparse {check.get('no_longer_sparse') or 'none'}, "
                     f"newly sparse {check.get('newly_sparse') or 'none'}")
    return ", ".join(parts)


def key_numbers(stage) -> str:
    d = stage.details
    name = stage.stage.split(":")[0]
    if name == "densify":
        return _densify_numbers(d)
    if name != stage.stage:  # a densified round's stage: the same numbers as the first round's
        from dataclasses import replace

        return key_numbers(replace(stage, stage=name))
    if stage.stage == "prune":
        text = (f"{d.get('pruned_layers')} layers pruned ({d.get('sparse_layers')} run sparse), "
                f"MAC reduction {d.get('mac_reduction') or 0:.1%}")
        if d.get("pruned_for"):
            text += (f"; pruned for {d['pruned_for']} ({d.get('kept_dense_for_backend')} layers it runs dense "
                     "kept dense)")
        return text
    if stage.stage == "distill":
        before, after = d.get("top1_before"), d.get("top1_after")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            return f"{d.get('epochs')} epochs, top-1 {before:.2f}% -> {after:.2f}% (teacher {d.get('top1_teacher'):.2f}%)"
        return f"{d.get('epochs')} epochs"
    if stage.stage == "export":
        diff = d.get("ort_max_abs_diff")
        return (f"{d.get('eligible_2_4')} of {d.get('annotated')} annotated tensors eligible 2:4"
                + (f"; ORT vs PyTorch {diff:.1e}" if isinstance(diff, float) else ""))
    if stage.stage == "build":
        parts = [d.get("precision") or ""]
        parts += [f"{v} {_mib(d[f'{v}_bytes'])}" for v in ("sparse", "dense") if f"{v}_bytes" in d]
        if "eligible" in d:
            parts.append(f"eligible {d['eligible']} / picked sparse {d.get('picked_sparse')}")
        if "converted_layers" in d:
            parts.append(f"{d['converted_layers']} layers converted")
        if d.get("providers"):
            parts.append(",".join(p.replace("ExecutionProvider", "") for p in d["providers"]))
        if d.get("warnings"):
            parts.append(f"{d['warnings']} warnings")
        return ", ".join(p for p in parts if p)
    if stage.stage == "audit":
        if "reason" in d:
            return d["reason"]
        summary = d.get("summary") or {}
        parts = ["passed" if d.get("passed") else "FAILED"]
        for key in ("top1_dense", "top1_sparse", "agreement"):
            if isinstance(summary.get(key), (int, float)):
                parts.append(f"{key} {summary[key]:.4f}")
        speed = summary.get("speedup_p50")
        if isinstance(speed, dict) and speed:
            # dense p50 / sparse p50 per batch size (> 1: sparse faster)
            parts.append("dense/sparse p50 " + " ".join(f"b{k}:{v:.2f}" for k, v in speed.items()
                                                         if isinstance(v, (int, float))))
        return ", ".join(parts)
    return ""


def print_summary(result) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.root}  (backend {result.backend})")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("key numbers")
    for s in result.stages:
        table.add_row(s.stage, s.status, f"{s.seconds:.1f}", key_numbers(s))
    Console(file=sys.stdout, width=160).print(table)


def main(args: argparse.Namespace) -> int:
    from mpdeploy.pipeline.build import run_build
    from mpdeploy.commands.progress import stage_progress
    from mpdeploy.commands.arguments import spec_from_args

    configs = configs_from_args(args)
    spec = spec_from_args(args, default=DEFAULT_MODEL)
    with stage_progress("build") as progress:
        result = run_build(spec, configs.prune, configs.export, configs.build, configs.stage, progress=progress,
                           distill_config=configs.distill, audit_config=configs.audit)
    print_summary(result)
    audits = [s for s in result.stages if s.stage.split(":")[0] == "audit"]
    audit = audits[-1]  # the densified engine's, when a densify round ran: the one to ship
    if audit.status != "skipped" and audit.details.get("passed") is False:
        # The engines are built; the verdict is the audit's: exit 1 like `mpdeploy audit`, so a pipeline
        # stops here (ship refuses a failed audit without --force too).
        print(f"audit FAILED: {'; '.join(map(str, audit.details.get('failures') or [])) or f'see audit/{AuditFolder.MARKDOWN}'}")
        return 1
    return 0

"""`mpdeploy audit ENGINE_DIR [--data DIR|digits|synthetic] [--backend B] [--batch-sizes 1,8,32] ...`.

Exit code: 0 the audit passed, 1 it failed (the engine is measurably worse than allowed), 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import DATA_SOURCES
from mpdeploy.core.trust import add_trust_arguments


BACKENDS = ("trt", "torch", "ort")


def add_audit_options(group) -> None:
    """The audit's measuring options and gates; shared by `mpdeploy audit` and `mpdeploy build`."""
    group.add_argument("--warmup", type=int, default=10,
                       help="at most this many warm-up calls per engine and batch size; stops early once stable (default: 10)")
    group.add_argument("--repeats", type=int, default=30, help="at most this many interleaved timing rounds per batch size "
                                                               "(default: 30)")
    group.add_argument("--min-rounds", type=int, default=5, help="at least this many timing rounds (default: 5)")
    group.add_argument("--ratio-tolerance", type=float, default=0.02,
                       help="stop timing a batch size once the speedup's 95%% interval is within +-this (default: 0.02)")
    group.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS",
                       help="bound on the audit: accuracy 35%%, timing 45%%, sensitivity 20%% (default: 120; 0: no bound)")
    group.add_argument("--eval-workers", type=int, default=None,
                       help="DataLoader workers for the evaluation images (default: auto)")
    group.add_argument("--calls-per-round", type=int, default=3, help="calls of one engine per round (default: 3)")
    group.add_argument("--max-eval-images", type=int, default=None, help="evaluate at most this many images")
    group.add_argument("--max-top1-drop", type=float, default=0.02,
                       help="fail above this absolute top-1 drop, as a fraction (default: 0.02 = 2 points)")
    group.add_argument("--min-speedup", type=float, default=None,
                       help="fail if dense p50 / sparse p50 at the largest batch is below this (default: no gate)")
    group.add_argument("--sensitivity-batch", type=int, default=16,
                       help="images for the per-layer sensitivity map (default: 16; 0 skips it)")
    group.add_argument("--sensitivity-max-layers", type=int, default=24,
                       help="measure at most this many pruned layers, spread over the depth (default: 24)")
    group.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity map")
    group.add_argument("--no-plots", action="store_true", help="write audit.json and audit.md without PNG plots")


def audit_config_from_args(args: argparse.Namespace, data: str, backend: str | None, batch_sizes: str):
    """An AuditConfig from the options `add_audit_options` added (validated here, before any work)."""
    from mpdeploy.audit import AuditConfig
    from mpdeploy.commands.build import parse_batch_sizes

    return AuditConfig(
        data=data,
        backend=backend,
        batch_sizes=parse_batch_sizes(batch_sizes),
        warmup=args.warmup,
        repeats=args.repeats,
        calls_per_round=args.calls_per_round,
        max_eval_images=args.max_eval_images,
        max_top1_drop=args.max_top1_drop,
        min_speedup=args.min_speedup,
        sensitivity_batch=args.sensitivity_batch,
        min_rounds=args.min_rounds,
        ratio_tolerance=args.ratio_tolerance,
        time_budget_s=args.time_budget or None,
        eval_workers=args.eval_workers,
        sensitivity=not args.no_sensitivity,
        sensitivity_max_layers=args.sensitivity_max_layers,
        plots=not args.no_plots,
        seed=getattr(args, "seed", 0),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine folder (engines/<name>)")
    parser.add_argument("--data", default="digits", help=f"evaluation images: {DATA_SOURCES} (smoke runs: no "
                                                          "labels) (default: digits)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="which engine-<backend>/ to audit (default: the only one, else the first usable)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to time (default: 1,8,32)")
    add_audit_options(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads (default: what the engine was built with)")
    parser.add_argument("--seed", type=int, default=0)
    add_trust_arguments(parser)  # rebuilding the model may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.audit import audit, read_audit, verdict_line
    from mpdeploy.backends.base import BuildConfig
    from mpdeploy.commands.progress import stage_progress

    config = audit_config_from_args(args, args.data, args.backend, args.batch_sizes)
    runtime = BuildConfig(threads=args.threads) if args.threads is not None else None
    with stage_progress("audit") as progress:
        path = audit(args.engine_dir, config, progress=progress, runtime=runtime)
    result = read_audit(args.engine_dir)
    print(verdict_line(result, path))
    for failure in result["failures"]:
        print(f"  failed: {failure}")
    return 0 if result["passed"] else 1

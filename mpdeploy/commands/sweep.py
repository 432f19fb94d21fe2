"""`mpdeploy sweep [MODEL] --grid KEY=V1,V2 ... --max-top1-drop 0.01 --objective p50@b8 [--promote K]`.

Runs the chain of `mpdeploy build` (prune -> distill -> export -> engine -> audit) for every combination of
the grid, on a local Ray (default) or the cluster at --ray-address, and writes `<out>/sweep/`: the fastest
trial within the accuracy budget, the Pareto front and why every other trial lost. The model, data, pruning,
engine and audit flags are build's; the grid overrides them per trial. Exit 1 when no trial meets the budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import add_audit_options, add_engine_options, add_model_arguments
from mpdeploy.commands.build import DEFAULT_CALIB, DEFAULT_MODEL
from mpdeploy.commands.prune import add_prune_arguments
from mpdeploy.core.kinds import SweepFolder
from mpdeploy.core.names import BACKENDS

GRID_HELP = ("search space, one KEY=V1,V2,... per key: pattern, extra-patterns (joined by +), budget, saliency, "
             "target-mac-reduction, tome, restore, permute, prune-head, distill-epochs, precision; e.g. "
             "--grid budget=mp,uniform saliency=magnitude,wanda precision=fp32,int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    add_prune_arguments(parser)
    s = parser.add_argument_group("sweep")
    s.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help=GRID_HELP)
    s.add_argument("--objective", default="p50@b8",
                   help="what the choice optimizes: p50@bN or p99@bN (ms, lower is better) or throughput@bN "
                        "(images/s) of the sparse engine; N must be one of --batch-sizes (default: p50@b8)")
    s.add_argument("--promote", type=int, default=None, metavar="K",
                   help="screen every trial's pruned accuracy first (seconds each), build and audit the best K only")
    s.add_argument("--search", default="grid", choices=["grid", "optuna"],
                   help="grid: every combination (default); optuna: Optuna's multi-objective search, --samples trials")
    s.add_argument("--samples", type=int, default=None, help="with --search optuna: how many trials (default 16)")
    s.add_argument("--search-seed", type=int, default=0,
                   help="with --search optuna: the sampler's seed (default 0; the same seed samples the same trials)")
    s.add_argument("--ray-address", default=None,
                   help="run on this Ray cluster (e.g. HOST:6379 or ray://HOST:10001); default: a local Ray")
    s.add_argument("--gpu-kinds", default=None, metavar="A40,A100",
                   help="build and time every engine on each of these GPU kinds (Ray resource accelerator_type:KIND)")
    s.add_argument("--concurrent", type=int, default=None,
                   help="trials at once (default: one per core; threads per trial = cores / trials)")
    s.add_argument("--retries", type=int, default=2, help="times Ray Tune re-runs a trial whose worker died (default 2)")
    s.add_argument("--num-cpus", type=int, default=None, help="cores of the local Ray (default: all)")
    s.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="engine backend of every trial (default: auto)")
    s.add_argument("--out", type=Path, default=None, help="sweep folder (default: sweeps/<model name>)")
    g = parser.add_argument_group("engines")
    add_engine_options(g)
    a = parser.add_argument_group("audit (--max-top1-drop is the sweep's accuracy constraint)")
    a.add_argument("--eval-data", default="digits",
                   help="evaluation images: an ImageFolder DIR, digits (default) or synthetic")
    add_audit_options(a)
    d = parser.add_argument_group("distillation")
    d.add_argument("--distill-epochs", type=int, default=0, help="recovery epochs of every trial (default 0; a grid key)")
    d.add_argument("--distill-data", default=None, help="labelled data for distillation: DIR or digits (default)")
    e = parser.add_argument_group("export")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    e.add_argument("--allow-ineligible", action="store_true")


def _absolute(value: str | None) -> str | None:
    """Data and model paths as absolute paths: trials run in Ray workers, elsewhere or in another folder."""
    if value is None or value in ("digits", "synthetic") or ":" in value.split("/")[0]:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def sweep_configs_from_args(args: argparse.Namespace):
    """(plan, request) from the flags, every one validated before anything heavy runs."""
    from mpdeploy.backends.base import resolve_backend
    from mpdeploy.commands.arguments import audit_config_from_args, build_config_from_args
    from mpdeploy.commands.prune import prune_config_from_args
    from mpdeploy.core.errors import MpdeployError
    from mpdeploy.export.stage import ExportConfig
    from mpdeploy.commands.arguments import spec_from_args
    from mpdeploy.pipeline.sweep.pipeline import SweepRequest
    from mpdeploy.pipeline.sweep.space import parse_grid, parse_objective
    from mpdeploy.pipeline.sweep.store import Store
    from mpdeploy.pipeline.sweep.trial import SweepPlan

    for name in ("calib", "eval_data", "distill_data", "model"):
        setattr(args, name, _absolute(getattr(args, name)))
    if args.checkpoint is not None:
        args.checkpoint = args.checkpoint.resolve()
    if args.model is None and args.calib is None:
        args.calib = DEFAULT_CALIB
    grid = parse_grid(args.grid)
    objective = parse_objective(args.objective)
    build = build_config_from_args(args, calib=args.calib)
    if objective.batch not in build.batch_sizes:
        raise MpdeployError(f"--objective {objective.label} times batch {objective.batch}, which is not in "
                            f"--batch-sizes {args.batch_sizes}; add it")
    if args.distill_epochs < 0:
        raise MpdeployError(f"--distill-epochs must be 0 or more, got {args.distill_epochs}")
    kinds = tuple(k.strip() for k in (args.gpu_kinds or "").split(",") if k.strip())
    request = SweepRequest(grid=grid, objective=objective, max_drop=args.max_top1_drop, promote=args.promote,
                           ray_address=args.ray_address, gpu_kinds=kinds, search=args.search, samples=args.samples,
                           search_seed=args.search_seed, concurrent=args.concurrent, retries=args.retries,
                           num_cpus=args.num_cpus)
    backend, reason = (args.backend, "asked for") if kinds and args.backend != "auto" else resolve_backend(args.backend)
    distill = None
    if args.distill_epochs or "distill-epochs" in grid:
        from mpdeploy.distill.config import DistillConfig

        eval_data = args.eval_data if args.eval_data not in ("digits", "synthetic") else None
        # A template when the grid sets the epochs per trial (0 there: no recovery for that trial).
        distill = DistillConfig(data=args.distill_data or "digits", epochs=max(1, args.distill_epochs),
                                eval_data=eval_data)
    spec = spec_from_args(args, default=DEFAULT_MODEL)
    out = (args.out or Path("sweeps") / spec.source.split(":")[-1].replace("/", "_")).resolve()
    plan = SweepPlan(spec=spec, prune=prune_config_from_args(args), distill=distill,
                     export=ExportConfig(opset=args.opset, exporter=args.exporter,
                                         allow_ineligible=args.allow_ineligible),
                     build=build, audit=audit_config_from_args(args, args.eval_data, backend, args.batch_sizes),
                     backend=backend, backend_reason=reason, store=Store(out), objective=objective)
    return plan, request


def main(args: argparse.Namespace) -> int:
    from mpdeploy.commands.progress import stage_progress
    from mpdeploy.pipeline.sweep.pipeline import run_sweep

    plan, request = sweep_configs_from_args(args)
    with stage_progress("sweep") as progress:
        result = run_sweep(plan, request, progress=progress)
    rows = {r["id"]: r for r in result.rows}
    failed = sum(1 for r in result.rows if r.get("status") == "failed")
    print(f"{result.folder}: {len(result.rows)} rows ({failed} failed) in {result.seconds:.1f} s")
    for kind, chosen in result.choice.items():
        row = rows.get(chosen) if chosen else None
        if row is None:
            print(f"  {kind}: no trial met the accuracy constraint")
        else:
            config = " ".join(f"{k}={v}" for k, v in row["config"].items())
            print(f"  {kind}: choice {chosen} ({config}); {row.get('verdict')}")
    print(f"  table and reasons: {result.folder / SweepFolder.MARKDOWN}")
    return 0 if all(result.choice.values()) else 1

"""`mpdeploy prune MODEL --pattern 2:4 --budget mp --saliency wanda --calib DIR --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import DATA_SOURCES, add_model_arguments
from mpdeploy.core.names import BACKENDS


def parse_tome(text: str | None):
    """`--tome 8` or a per-block list `--tome 8,8,4,...`."""
    from mpdeploy.core.errors import MpdeployError

    if text is None:
        return 0
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MpdeployError(f"--tome takes an integer r or a comma list per block, not {text!r}") from None
    if not values or min(values) < 0:
        raise MpdeployError(f"--tome needs non-negative integers, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Pruning flags shared by `prune` and `build`."""
    g = parser.add_argument_group("pruning")
    g.add_argument("--pattern", default="2:4", help="N:M pattern, e.g. 2:4 (default), 8:16")
    g.add_argument("--extra-patterns", default="", help="more patterns the mp budget may choose, e.g. 1:4,8:16")
    # Names come from the budget / saliency registries, checked when the config is made: importing the
    # registries here would pull torch into `--help`. An unknown name gets one line listing the registered ones.
    g.add_argument("--budget", default="mp",
                   help="layerwise budget from mpdeploy.sparsity.budgets' registry: mp (default), damage, uniform, "
                        "sensitivity, mp-sensitivity (these two measure each layer's effect on the outputs: need --calib)")
    g.add_argument("--saliency", default=None,
                   help="what to keep in each group, from mpdeploy.sparsity.saliency's registry: magnitude, wanda, block-cost, "
                        "sparsegpt, auto (default: auto with --calib, else magnitude)")
    g.add_argument("--calib", default=None, help=f"calibration data: {DATA_SOURCES}")
    g.add_argument("--calib-batches", type=int, default=8)
    g.add_argument("--calib-batch-size", type=int, default=16)
    g.add_argument("--calib-dtype", default="auto",
                   help="dtype of the calibration forward passes (statistics stay float32); auto (default): bfloat16 "
                        "for models of at least 1 GMAC per image on a CPU with native bfloat16, else float32")
    g.add_argument("--target-mac-reduction", type=float, default=None,
                   help="global MAC-reduction target for the mp budget (default: 90%% of what the pattern allows)")
    g.add_argument("--prune-head", action="store_true", help="also prune the classifier head")
    g.add_argument("--permute", action="store_true", help="search input-channel permutations (folded, free at run time)")
    g.add_argument("--restore", action="store_true", help="refit kept weights on calibration data (needs --calib)")
    g.add_argument("--tome", default=None, help="token merging for ViTs: r per block (int or comma list)")


def prune_config_from_args(args: argparse.Namespace):
    from mpdeploy.sparsity.patterns import parse_pattern
    from mpdeploy.prune.stage import PruneConfig

    from mpdeploy.sparsity.budgets import get_budget
    from mpdeploy.sparsity.saliency import DEFAULT_CALIB_SALIENCY, get_saliency

    saliency = get_saliency(args.saliency or (DEFAULT_CALIB_SALIENCY if args.calib else "magnitude")).name
    get_budget(args.budget)
    extra = tuple(parse_pattern(p) for p in args.extra_patterns.split(",") if p.strip())
    return PruneConfig(
        pattern=parse_pattern(args.pattern),
        extra_patterns=extra,
        budget=args.budget,
        saliency=saliency,
        calib=args.calib,
        calib_batches=args.calib_batches,
        calib_batch_size=args.calib_batch_size,
        calib_dtype=args.calib_dtype,
        target_mac_reduction=args.target_mac_reduction,
        include_head=args.prune_head,
        permute=args.permute,
        restore=args.restore,
        tome=parse_tome(args.tome),
    )


def backend_prune_config(config, args: argparse.Namespace):
    """`config` pruning for `args.backend` (and its precision / torch options), or unchanged without one."""
    import dataclasses

    if args.backend is None:
        return config
    options = (("kernel", args.torch_kernel), ("conv1x1", args.conv1x1))
    return dataclasses.replace(config, backend=args.backend, backend_precision=args.precision,
                               backend_options=tuple((k, v) for k, v in options if v is not None))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_prune_arguments(parser)
    g = parser.add_argument_group("prune for a backend")
    g.add_argument("--backend", default=None, choices=list(BACKENDS),
                   help="prune only the layers this backend runs sparse (its own plan: TensorRT's placement rules, or "
                        "torch's conversion plan; without sparse kernels, TensorRT's rules for a later GPU build); "
                        "default: every eligible layer")
    g.add_argument("--precision", default=None, choices=["fp16", "bf16", "int8", "fp32"],
                   help="the engine precision the backend's plan is for (torch; default fp16)")
    g.add_argument("--torch-kernel", default=None, choices=["cusparselt", "cutlass"],
                   help="torch: the semi-structured kernel whose shape rules apply (default cusparselt)")
    g.add_argument("--conv1x1", default=None, choices=["large", "all", "off"],
                   help="torch: which 1x1 convs run as sparse Linear (default large: >= 256 channels)")
    parser.add_argument("--out", type=Path, default=None, help="artifact folder (default: engines/<name>/pruned)")


def main(args: argparse.Namespace) -> int:
    from mpdeploy.commands.progress import stage_progress
    from mpdeploy.commands.arguments import load_model_from_args
    from mpdeploy.prune.stage import prune

    config = backend_prune_config(prune_config_from_args(args), args)  # validate flags before loading anything heavy
    loaded = load_model_from_args(args)
    out = args.out or Path("engines") / loaded.name / "pruned"
    with stage_progress("prune") as progress:
        path = prune(loaded, config, out, progress=progress)
    from mpdeploy.core.artifacts import read_manifest

    totals = read_manifest(path, "pruned", verify=False)["totals"]
    print(
        f"{path}: {totals['pruned_layers']} layers pruned ({totals['sparse_layers']} run sparse), "
        f"{totals['skipped_layers']} kept dense; MAC reduction {totals['mac_reduction']:.1%}, "
        f"sparse-execution {totals['sparse_execution_mac_reduction']:.1%}"
    )
    pruned_for = read_manifest(path, "pruned", verify=False).get("pruned_for")
    if pruned_for:
        print(f"pruned for {pruned_for['backend']} ({pruned_for['rules']}): {len(pruned_for['runs_dense'])} "
              "eligible layers kept dense, as it would run them dense")
        if pruned_for.get("note"):
            print(pruned_for["note"])
    return 0

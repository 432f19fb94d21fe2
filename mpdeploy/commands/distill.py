"""`mpdeploy distill PRUNED_ARTIFACT [--teacher MODEL] [--data DIR|digits] [--epochs 3] [--out DIR]`.

Writes a new `distilled/` artifact whose manifest records the input as its source.

Also runs under `torchrun --nproc_per_node=N -m mpdeploy distill ...` (DistributedDataParallel); only
rank 0 draws the progress bar and prints the summary.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mpdeploy.commands.arguments import LABELLED_SOURCES
from mpdeploy.core.trust import add_trust_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pruned", type=Path, metavar="PRUNED_ARTIFACT", help="a pruned/ folder from `mpdeploy prune`")
    parser.add_argument("--teacher", default=None,
                        help="teacher model (timm:NAME, zoo:NAME or a file); default: the artifact's dense twin")
    parser.add_argument("--data", default="digits", help=f"training images: {LABELLED_SOURCES} (default: digits)")
    parser.add_argument("--eval-data", default=None,
                        help="labelled images top-1 is measured on before and after: an ImageFolder DIR, an .npz / "
                             ".safetensors with labels, or digits (default: digits' test split when training on "
                             "digits, else a sample of the training data, which the record says is not held out)")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs (default: 3)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the paper's, scaled up for short runs; see docs/distill.md)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch, split across processes (default: 64 on CPU, 256 on GPU)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                        help="default: sgd (momentum 0.9) for models with BatchNorm, adamw otherwise (ViTs, ConvNeXts)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term against CE (default: 0.5)")
    parser.add_argument("--temperature", type=float, default=2.0, help="KD softmax temperature (default: 2)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="CE label smoothing (default: 0.1)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on for CUDA, off for CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of an interrupted run")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the distilled artifact here (default: distilled/ beside PRUNED_ARTIFACT; "
                             "the input is never rewritten)")
    add_trust_arguments(parser)  # rebuilding the model may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.distill.config import DistillConfig
    from mpdeploy.distill.stage import distill

    config = DistillConfig(  # validate flags before loading anything heavy
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        alpha=args.alpha,
        temperature=args.temperature,
        label_smoothing=args.label_smoothing,
        amp=args.amp,
        seed=args.seed,
        teacher=args.teacher,
        eval_data=args.eval_data,
        resume=not args.no_resume,
        device=args.device,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        distill(args.pruned, config, args.out)
        return 0

    from mpdeploy.core.artifacts import read_manifest
    from mpdeploy.commands.progress import stage_progress

    with stage_progress("distill") as progress:  # shows loss and images/s beside the bar
        path = distill(args.pruned, config, args.out, progress=progress)
    result = read_manifest(path, "distilled", verify=False)["distill"]
    epochs = result["epochs"]
    line = f"{path}: {len(epochs)} epochs, final loss {epochs[-1]['loss']:.4f}" if epochs else f"{path}: no epochs run"
    if result.get("top1_after") is not None:
        line += (f"; top-1 {result['top1_before']:.2f}% -> {result['top1_after']:.2f}% "
                 f"(teacher {result['top1_teacher']:.2f}%, {result['top1_split']})")
    print(line)
    return 0

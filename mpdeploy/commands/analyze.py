"""`mpdeploy analyze MODEL [--out DIR] [--no-plots]`: per-layer Marchenko-Pastur fit, with plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import add_model_arguments
from mpdeploy.core.kinds import AnalyzeFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: engines/<model>/analyze)")
    parser.add_argument("--no-plots", action="store_true", help=f"write {AnalyzeFolder.SPECTRA} only (much faster on big models)")
    parser.add_argument("--max-layer-plots", type=int, metavar="N", help="plot only the first N fitted layers")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mpdeploy.analyze.stage import AnalyzeConfig, analyze
    from mpdeploy.commands.arguments import load_model_from_args

    loaded = load_model_from_args(args)
    out = args.out or Path("engines") / loaded.name / "analyze"
    config = AnalyzeConfig(plots=not args.no_plots, max_layer_plots=args.max_layer_plots)
    console = Console(stderr=True)
    columns = (TextColumn("analyze"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        path = analyze(loaded.module, config, out, progress=report)
    print(path)
    return 0

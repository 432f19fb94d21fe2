"""`mpdeploy report ENGINE_DIR... [--out report.md] [--no-plots]`: several audits side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.core.kinds import AuditFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dirs", type=Path, nargs="+", metavar="ENGINE_DIR",
                        help=f"audited engine folders (engines/<name>, each with audit/{AuditFolder.RESULT})")
    parser.add_argument("--out", type=Path, default=Path("report.md"),
                        help="Markdown file to write (default: report.md); the plot goes beside it as .png")
    parser.add_argument("--no-plots", action="store_true", help="Markdown table only")


def main(args: argparse.Namespace) -> int:
    from mpdeploy.audit.compare import ReportConfig, report

    print(report(args.engine_dirs, ReportConfig(out=args.out, plots=not args.no_plots)))
    return 0

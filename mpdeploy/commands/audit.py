"""`mpdeploy audit ENGINE_DIR [--data DIR|digits|synthetic] [--backend B] [--batch-sizes 1,8,32] ...`.

Exit code: 0 the audit passed, 1 it failed (the engine is measurably worse than allowed), 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import DATA_SOURCES, add_audit_options, audit_config_from_args
from mpdeploy.core.names import BACKENDS
from mpdeploy.core.trust import add_trust_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR", help="engine folder (engines/<name>)")
    parser.add_argument("--data", default="digits", help=f"evaluation images: {DATA_SOURCES} (smoke runs: no "
                                                          "labels) (default: digits)")
    parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="which engine-<backend>/ to audit (default: the only one, else the first usable)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="batch sizes to time (default: 1,8,32)")
    add_audit_options(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads (default: what the engine was built with)")
    parser.add_argument("--seed", type=int, default=0)
    add_trust_arguments(parser)  # rebuilding the model may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.audit.stage import audit, read_audit, verdict_line
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

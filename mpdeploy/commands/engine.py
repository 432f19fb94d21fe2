"""`mpdeploy engine ONNX_ARTIFACT [--backend ort|torch|trt] [--precision fp32] [--out DIR]`.

Builds the sparse engine and its dense twin from an existing `onnx/` artifact (and the weights it
records as its source): another backend or precision without re-running prune and export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.commands.arguments import DATA_SOURCES, add_engine_options, build_config_from_args
from mpdeploy.core.names import BACKENDS
from mpdeploy.core.trust import add_trust_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", type=Path, metavar="ONNX_ARTIFACT", help="an onnx/ folder from `mpdeploy export`")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="auto = the first usable of trt > torch > ort (default: auto)")
    parser.add_argument("--dense-only", action="store_true", help="build only the dense engine")
    parser.add_argument("--out", type=Path, default=None, help="engine folder (default: engine-<backend>/ beside onnx/)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished engine matches")
    parser.add_argument("--calib", default=None, help=f"int8 calibration data: {DATA_SOURCES}")
    add_engine_options(parser)
    add_trust_arguments(parser)  # rebuilding the model may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.backends.base import resolve_backend
    from mpdeploy.commands.progress import stage_progress
    from mpdeploy.engine.stage import build_engines

    build_config = build_config_from_args(args, calib=args.calib)
    backend, reason = resolve_backend(args.backend)
    variants = ("dense",) if args.dense_only else ("sparse", "dense")
    with stage_progress("engine") as progress:
        result = build_engines(args.onnx, backend, build_config, out=args.out, variants=variants, force=args.force,
                               progress=progress, backend_reason=reason)
    d = result.details
    sizes = ", ".join(f"{v} {d[f'{v}_bytes'] / 2**20:.1f} MiB" for v in variants if f"{v}_bytes" in d)
    print(f"{result.path}: {result.status} {backend} {d.get('precision')} engines ({sizes})")
    return 0

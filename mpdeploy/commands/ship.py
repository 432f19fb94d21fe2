"""`mpdeploy ship ENGINE_DIR --repo TRITON_REPO`: put an audited engine into a Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.core.names import BACKENDS, VARIANTS
from mpdeploy.serve.ship import KINDS, SERVE_BACKENDS, ShipConfig, ship_verified
from mpdeploy.serve.triton_repo import CONFIG_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", type=Path, metavar="ENGINE_DIR",
                        help="engine folder (engines/<name>), or a sweep/ folder: its verified choice is shipped")
    parser.add_argument("--gpu-kind", help="with a sweep folder that chose per GPU kind: the kind whose choice to ship")
    parser.add_argument("--repo", type=Path, required=True, metavar="TRITON_REPO", help="Triton model repository")
    parser.add_argument("--name", help="model name in the repository (default: the engine folder's name)")
    parser.add_argument("--version", type=int, help="model version (default: next free, from 1); never overwritten")
    parser.add_argument("--max-batch-size", type=int, default=8, help="Triton max_batch_size; 0 disables batching")
    parser.add_argument("--variant", choices=VARIANTS, default="sparse", help="which engine of the pair to serve")
    parser.add_argument(
        "--serve-backend",
        choices=SERVE_BACKENDS,
        default="auto",
        help="auto: the engine's platform (tensorrt_plan / onnxruntime_onnx); "
        "python: ONNX Runtime inside Triton's Python backend (ort engines)",
    )
    parser.add_argument("--instance-count", type=int, default=1, help="model instances per device")
    parser.add_argument("--kind", choices=KINDS, help="instance kind (default: KIND_GPU for plans, else KIND_CPU)")
    parser.add_argument(
        "--engine-backend", choices=list(BACKENDS), help="which engine-<backend>/ to ship (default: the audited one)"
    )
    parser.add_argument(
        "--python-env", type=Path, help="EXECUTION_ENV_PATH for --serve-backend python (default: this Python's prefix)"
    )
    parser.add_argument(
        "--force", action="store_true", help=f"ship an unaudited or failed engine; replace a different {CONFIG_FILE} "
        "(never skips verifying the engine and the audit's tie to it)"
    )


def main(args: argparse.Namespace) -> int:
    config = ShipConfig(
        repo=args.repo,
        name=args.name,
        version=args.version,
        max_batch_size=args.max_batch_size,
        variant=args.variant,
        serve_backend=args.serve_backend,
        instance_count=args.instance_count,
        kind=args.kind,
        force=args.force,
        engine_backend=args.engine_backend,
        python_env=args.python_env,
    )
    print(ship_verified(engine_root(args.engine_dir, args.gpu_kind), config).line())
    return 0


def engine_root(path: Path, gpu_kind: str | None) -> Path:
    """ENGINE_DIR as given, or the engine root (engine-<backend>/ + audit/) of a verified sweep's choice."""
    from mpdeploy.pipeline.sweep.report import chosen_audit, is_sweep_folder

    if not is_sweep_folder(path):
        return path
    audit_dir = chosen_audit(path, kind=gpu_kind)
    print(f"sweep {path}: shipping its choice, audited in {audit_dir}")
    return audit_dir.parent

"""`mpdeploy densify ENGINE_DIR [--slow-layers FILE] [--trt-log FILE] [--out DIR]`.

Reads which pruned layers the engine ran sparse (TensorRT's picked list, torch's converted list) and
writes a new pruned artifact in which the others carry their dense weights again (default:
`densified/pruned` beside the engine). A pruned/ folder with `--backend torch` uses torch's conversion
plan computed here; an onnx/ folder with `--trt-log` a TensorRT build log recorded elsewhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.core.names import backends_with
from mpdeploy.core.trust import add_trust_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="ENGINE_DIR",
                        help="engines/<name>/engine-<backend> (or an onnx/ folder with --trt-log, or a pruned/ "
                             "folder with --backend torch)")
    parser.add_argument("--slow-layers", type=Path, default=None,
                        help="file of layers whose sparse kernel timed slower than dense on the GPU (JSON list, "
                             "{\"slow_layers\": [...]}, or one name per line): given back too")
    parser.add_argument("--trt-log", type=Path, default=None,
                        help="a recorded TensorRT verbose build log (or engine-inspector JSON) to read instead of "
                             "the engine's own report")
    parser.add_argument("--backend", default=None, choices=backends_with("plan_from_weights"),
                        help="for a pruned/ folder: compute this backend's conversion plan here (no GPU needed)")
    parser.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32"],
                        help="torch plan: engine precision (default fp16)")
    parser.add_argument("--torch-kernel", default=None, choices=["cusparselt", "cutlass"])
    parser.add_argument("--conv1x1", default=None, choices=["large", "all", "off"])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: densified/pruned beside the input)")
    add_trust_arguments(parser)  # --backend torch re-creates the pruned model: may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.densify.stage import DensifyConfig, densify

    config = DensifyConfig(slow_layers=str(args.slow_layers) if args.slow_layers else None,
                           trt_log=str(args.trt_log) if args.trt_log else None, backend=args.backend,
                           precision=args.precision, kernel=args.torch_kernel, conv1x1=args.conv1x1)
    result = densify(args.path, config, out=args.out)
    evidence = result.evidence
    if result.path is None:
        print(f"{args.path}: every pruned layer ran sparse ({evidence.source}); nothing to give back, nothing written")
        return 0
    print(f"{result.path}: {len(evidence.ran_dense)} layers given their dense weights back, "
          f"{len(evidence.ran_sparse)} still sparse ({evidence.source})")
    for layer, why in evidence.ran_dense.items():
        print(f"  {layer}: {why}")
    if evidence.unknown:
        print(f"  kept sparse, use unknown: {', '.join(evidence.unknown)}")
    return 0

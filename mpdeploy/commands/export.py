"""`mpdeploy export PRUNED_ARTIFACT --out DIR [--opset N] [--no-dynamic-batch] [--fp16] [--exporter legacy|dynamo]
[--precision fp32|fp16|bf16|int8 [--calib DIR|digits|synthetic]]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpdeploy.core.names import PRECISIONS
from mpdeploy.core.trust import add_trust_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pruned", type=Path, metavar="PRUNED_ARTIFACT", help="a pruned/ folder from `mpdeploy prune`")
    parser.add_argument("--out", type=Path, default=None,
                        help="artifact folder (default: onnx/ beside the pruned folder)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--no-dynamic-batch", dest="dynamic_batch", action="store_false",
                        help="fix the batch dimension to 1 (default: dynamic axis 'batch')")
    parser.add_argument("--fp16", action="store_true",
                        help="store weights as FP16 (behind Cast to FP32; inputs and outputs stay FP32)")
    parser.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"],
                        help="torch.onnx exporter: legacy (TorchScript, default) or dynamo (torch.export)")
    parser.add_argument("--allow-ineligible", action="store_true",
                        help="export even if a layer pruned 2:4 is not 2:4-eligible for TensorRT (recorded, warned)")
    parser.add_argument("--check-batch", type=int, default=2, help="batch of the ONNX Runtime check (default: 2)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |ONNX Runtime - PyTorch| on the check inputs (default: 1e-4)")
    # precision (issue 16): the files TensorRT 10/11 build strongly typed engines from
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="also write model.<precision>.onnx + model.dense.<precision>.onnx: FP16/BF16 weights and "
                             "compute, or INT8 Q/DQ calibrated on --calib (default: fp32, FP32 files only)")
    parser.add_argument("--calib", default=None,
                        help="int8 calibration images: DIR | digits | synthetic (default: the pruned artifact's own)")
    parser.add_argument("--calib-images", type=int, default=128, help="int8 calibration images (default: 128)")
    add_trust_arguments(parser)  # rebuilding the model may re-open a pickle or import a class


def main(args: argparse.Namespace) -> int:
    from mpdeploy.export.stage import ExportConfig, export, load_sparsity

    config = ExportConfig(
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        fp16=args.fp16,
        exporter=args.exporter,
        allow_ineligible=args.allow_ineligible,
        check_batch=args.check_batch,
        atol=args.atol,
        precision=args.precision,
        calib=args.calib,
        calib_images=args.calib_images,
    )
    pruned = Path(args.pruned)
    out = args.out or pruned.parent / "onnx"
    path = export(pruned, config, out)
    record = load_sparsity(path, verify=False)  # just written and checked; no need to re-hash the weights
    s, ort = record["summary"], record["ort_check"]
    bad = f", {len(s['ineligible'])} NOT eligible" if s["ineligible"] else ""
    print(
        f"{path}: {s['annotated']} tensors annotated, {s['eligible_2_4']}/{s['runs_sparse']} sparse-pattern layers "
        f"2:4-eligible for TensorRT{bad}; ONNX Runtime max |diff| sparse {ort['max_abs_diff_sparse']:.1e}, "
        f"dense {ort['max_abs_diff_dense']:.1e} ({config.exporter} exporter, opset {config.opset})"
        + _precision_summary(record.get("precision"))
    )
    return 0


def _precision_summary(precision) -> str:
    if not precision:
        return ""
    check = precision["ort_check"]["sparse"]
    ran = (f", ORT top-1 agreement with fp32 {check['top1_agreement_vs_fp32']:.2f}" if check.get("run")
           else ", not run on ORT CPU")
    return f"; {precision['files']['sparse']}: {precision['eligible_2_4']} tensors 2:4-eligible{ran}"

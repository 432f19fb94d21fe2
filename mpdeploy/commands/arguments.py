"""The flags the commands share, and their parsing: the model (--input-shape, --model-kwargs, --arch,
--trust-pickle) and the preprocessing of its data; the engine options (build, engine); the audit's
options and gates (audit, build). Torch-free, so `mpdeploy CMD --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import AuditFolder
from mpdeploy.core.names import PRECISIONS
from mpdeploy.models.spec import COLORS, CROPS, ModelSpec, bounded_input_shape

def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(x) for x in str(text).replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise MpdeployError(f"cannot parse --input-shape {text!r}: write C,H,W, e.g. 3,224,224") from None
    if len(dims) != 3 or min(dims) < 1:
        raise MpdeployError(f"--input-shape {text!r} must be three positive integers C,H,W, e.g. 3,224,224")
    return bounded_input_shape(dims)


def parse_model_kwargs(text: str | None) -> tuple[tuple[str, Any], ...]:
    """`in_chans=1,embed_dim=128,img_size=(32,32),global_pool=None` -> (("in_chans", 1), ...).

    Values are Python literals read with ast.literal_eval (never eval); a bare word stays a string.
    """
    import ast

    if not text or not str(text).strip():
        return ()
    pairs, depth, current = [], 0, ""
    for ch in str(text) + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            if current.strip():
                pairs.append(current)
            current = ""
        else:
            current += ch
    if depth != 0 or current.strip():
        raise MpdeployError(f"--model-kwargs {text!r} has unbalanced brackets; write e.g. img_size=(32,32)")
    out = []
    for item in pairs:
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key.isidentifier() or not raw:
            raise MpdeployError(f"--model-kwargs item {item.strip()!r} must be NAME=VALUE, e.g. in_chans=1")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            if not raw.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise MpdeployError(f"--model-kwargs {key}={raw!r} is not a literal (number, True, None, "
                                    "tuple or word)") from None
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        out.append((key, value))
    return tuple(out)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The model-loading flags shared by analyze / prune / build."""
    nargs = None if required else "?"
    parser.add_argument(
        "model", nargs=nargs, default=None,
        help="timm:NAME, zoo:NAME, or a model file (.pt/.pth/.pt2/.safetensors)",
    )
    group = parser.add_argument_group("model loading")
    group.add_argument("--arch", help="architecture for a state_dict / safetensors file: a timm name, "
                       "zoo:NAME, or module:Class (your own nn.Module class, importable from PYTHONPATH)")
    group.add_argument("--checkpoint", type=Path, help="local weights for a timm: model (.safetensors or .pth)")
    group.add_argument("--input-shape", help="input C,H,W when the model cannot tell (e.g. 3,224,224)")
    group.add_argument("--num-classes", type=int, help="classifier size for --arch / timm models")
    group.add_argument("--model-kwargs", default=None,
                       help="architecture arguments for timm names / --arch, e.g. in_chans=1,embed_dim=128,"
                            "img_size=32 (Python literals, never evaluated as code)")
    group.add_argument("--weights", default="auto", choices=["auto", "pretrained", "random"],
                       help="timm weights: auto = pretrained when reachable, else random init (default: auto)")
    add_data_arguments(parser.add_argument_group("input preprocessing (ImageFolder data)"))
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow files that carry code: full pickles, TorchScript, torch.export .pt2 "
                            "(loading them runs code from the file; recorded so later stages re-open it)")


def spec_from_args(args: argparse.Namespace, default: str | None = None):
    from mpdeploy.models.data import data_spec_from_args

    source = args.model or default
    if source is None:
        raise MpdeployError("no model given; pass timm:NAME, zoo:NAME or a model file")
    return ModelSpec(
        source=source,
        arch=args.arch,
        checkpoint=args.checkpoint,
        input_shape=parse_input_shape(args.input_shape),
        num_classes=args.num_classes,
        weights=args.weights,
        trust_pickle=args.trust_pickle,
        model_kwargs=parse_model_kwargs(getattr(args, "model_kwargs", None)),
        data_spec=data_spec_from_args(args),
        data_sources=tuple(str(v) for v in (getattr(args, f, None) for f in DATA_SOURCE_FLAGS) if v),
    )


# Data flags whose sources are checked against the model before any stage runs.
DATA_SOURCE_FLAGS = ("calib", "distill_data", "data")


def load_model_from_args(args: argparse.Namespace, default: str | None = None):
    from mpdeploy.models.load import load_model

    return load_model(spec_from_args(args, default))


# What every data flag (--calib, --data, --eval-data, --distill-data) accepts: mpdeploy/models/data.py reads them.
TENSOR_FILES = "an .npz / .safetensors of tensors (`images` [N,C,H,W] at the model's input size, optional `labels`)"
DATA_SOURCES = f"an ImageFolder DIR, {TENSOR_FILES}, digits, or synthetic"
LABELLED_SOURCES = f"an ImageFolder DIR, {TENSOR_FILES.replace('optional', 'with')}, or digits"


def add_data_arguments(group) -> None:
    """Preprocessing flags for ImageFolder data (calibration, evaluation and distillation alike)."""
    group.add_argument("--mean", default=None, help="per-channel mean the model was trained with, e.g. 0.5 or "
                       "0.485,0.456,0.406 (default: the model's timm config)")
    group.add_argument("--std", default=None, help="per-channel std, same form as --mean")
    group.add_argument("--resize", type=int, default=None, help="shorter image side before the centre crop")
    group.add_argument("--crop", default="center", choices=CROPS,
                       help="center: resize then centre-crop (default) | resize: resize straight to H,W")
    group.add_argument("--color", default="auto", choices=COLORS,
                       help="image channels: auto = grayscale for 1-channel models, else RGB")
    group.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest"])


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise MpdeployError(f"--batch-sizes takes a comma list of integers, e.g. 1,8,32, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise MpdeployError(f"--batch-sizes needs positive integers, e.g. 1,8,32, not {text!r}")
    return sizes


def add_engine_options(g) -> None:
    """Engine build and run-time flags shared by `mpdeploy build` and `mpdeploy engine`."""
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="engine precision (default: fp16 on GPU backends, fp32 on ort); int8 uses --calib data")
    g.add_argument("--batch-sizes", default="1,8,32",
                   help="batch sizes the engine serves; optimization profile min/opt/max from them (default 1,8,32)")
    g.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads when running engines (recorded; the audit uses it)")
    g.add_argument("--workspace-mib", type=int, default=None, help="TensorRT builder workspace limit")
    g.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache (default: calib/cache/timing-<trt>-<gpu>.cache)")
    g.add_argument("--calib-cache", type=Path, default=None,
                   help="TensorRT INT8 calibration cache (default: calib/cache/<onnx sha>.cache)")
    g.add_argument("--torch-kernel", default=None, choices=["cusparselt", "cutlass"],
                   help="torch backend: semi-structured sparse kernel (default cusparselt)")
    g.add_argument("--conv1x1", default=None, choices=["large", "all", "off"],
                   help="torch backend: run 2:4 1x1 convs as sparse Linear (default large: >= 256 channels)")
    g.add_argument("--ort-optimization", default=None, choices=["basic", "none"],
                   help="ort backend: offline optimization saved as the engine (default basic)")
    g.add_argument("--ort-providers", default=None, choices=["auto", "cpu"],
                   help="ort backend: execution providers at run time, recorded with the engine and used by the "
                        "audit (default auto: TensorRT EP > CUDA EP > CPU)")


def build_config_from_args(args: argparse.Namespace, calib: str | None = None):
    from mpdeploy.backends.base import BuildConfig

    options = {"kernel": args.torch_kernel, "conv1x1": args.conv1x1, "optimization": args.ort_optimization,
               "providers": args.ort_providers}
    return BuildConfig(
        precision=args.precision,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        calib=calib,
        calib_cache=args.calib_cache,
        timing_cache=args.timing_cache,
        workspace_mib=args.workspace_mib,
        backend_options=tuple((k, v) for k, v in options.items() if v is not None),
        threads=args.threads,
    )


def add_audit_options(group) -> None:
    """The audit's measuring options and gates; shared by `mpdeploy audit` and `mpdeploy build`."""
    group.add_argument("--warmup", type=int, default=10,
                       help="at most this many warm-up calls per engine and batch size; stops early once stable (default: 10)")
    group.add_argument("--repeats", type=int, default=30, help="at most this many interleaved timing rounds per batch size "
                                                               "(default: 30)")
    group.add_argument("--min-rounds", type=int, default=5, help="at least this many timing rounds (default: 5)")
    group.add_argument("--ratio-tolerance", type=float, default=0.02,
                       help="stop timing a batch size once the speedup's 95%% interval is within +-this (default: 0.02)")
    group.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS",
                       help="bound on the audit: accuracy 35%%, timing 45%%, sensitivity 20%% (default: 120; 0: no bound)")
    group.add_argument("--eval-workers", type=int, default=None,
                       help="DataLoader workers for the evaluation images (default: auto)")
    group.add_argument("--calls-per-round", type=int, default=3, help="calls of one engine per round (default: 3)")
    group.add_argument("--max-eval-images", type=int, default=None, help="evaluate at most this many images")
    group.add_argument("--max-top1-drop", type=float, default=0.02,
                       help="fail above this absolute top-1 drop, as a fraction (default: 0.02 = 2 points)")
    group.add_argument("--min-speedup", type=float, default=None,
                       help="fail if dense p50 / sparse p50 at the largest batch is below this (default: no gate)")
    group.add_argument("--sensitivity-batch", type=int, default=16,
                       help="images for the per-layer sensitivity map (default: 16; 0 skips it)")
    group.add_argument("--sensitivity-max-layers", type=int, default=24,
                       help="measure at most this many pruned layers, spread over the depth (default: 24)")
    group.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity map")
    group.add_argument("--no-plots", action="store_true", help=f"write {AuditFolder.RESULT} and {AuditFolder.MARKDOWN} without PNG plots")


def audit_config_from_args(args: argparse.Namespace, data: str, backend: str | None, batch_sizes: str):
    """An AuditConfig from the options `add_audit_options` added (validated here, before any work)."""
    from mpdeploy.audit.config import AuditConfig

    return AuditConfig(
        data=data,
        backend=backend,
        batch_sizes=parse_batch_sizes(batch_sizes),
        warmup=args.warmup,
        repeats=args.repeats,
        calls_per_round=args.calls_per_round,
        max_eval_images=args.max_eval_images,
        max_top1_drop=args.max_top1_drop,
        min_speedup=args.min_speedup,
        sensitivity_batch=args.sensitivity_batch,
        min_rounds=args.min_rounds,
        ratio_tolerance=args.ratio_tolerance,
        time_budget_s=args.time_budget or None,
        eval_workers=args.eval_workers,
        sensitivity=not args.no_sensitivity,
        sensitivity_max_layers=args.sensitivity_max_layers,
        plots=not args.no_plots,
        seed=getattr(args, "seed", 0),
    )

"""The flags the commands share, and their parsing: the model (--input-shape, --model-kwargs, --arch,
--trust-pickle) and the preprocessing of its data. Torch-free, so `mpdeploy CMD --help` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError
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

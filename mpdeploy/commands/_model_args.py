"""Model-loading flags shared by analyze / prune / build, kept free of torch so `--help` stays fast.

(`mpdeploy.models.add_model_arguments` is the same set; models.py imports torch at module level.)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    nargs = None if required else "?"
    parser.add_argument(
        "model", nargs=nargs, default=None,
        help="timm:NAME, zoo:NAME, or a model file (.pt/.pth/.pt2/.safetensors)",
    )
    group = parser.add_argument_group("model loading")
    group.add_argument("--arch", help="timm architecture for a state_dict / safetensors file")
    group.add_argument("--checkpoint", type=Path, help="local weights for a timm: model (.safetensors or .pth)")
    group.add_argument("--input-shape", help="input C,H,W when the model cannot tell (e.g. 3,224,224)")
    group.add_argument("--num-classes", type=int, help="classifier size for --arch / timm models")
    group.add_argument("--weights", default="auto", choices=["auto", "pretrained", "random"],
                       help="timm weights: auto = pretrained when reachable, else random init (default: auto)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a fully pickled module (runs code from the file)")

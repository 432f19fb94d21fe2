"""Preprocessing flags for the user's data (no torch here: the CLI builds its parser from them)."""

from __future__ import annotations

CROPS = ("center", "resize")
COLORS = ("auto", "rgb", "grayscale")
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

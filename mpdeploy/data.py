"""Calibration and evaluation data: an ImageFolder tree, the built-in digits set, or synthetic noise.

The digits set (scikit-learn, 1,797 labelled 8x8 images, 10 classes) is the one real labelled set
that ships inside a package; its split is fixed (seeded) so every stage and benchmark sees the same
train / calibration / test images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

SPLITS = ("train", "calib", "test", "all")
DIGITS_TEST_FRACTION = 0.3
DIGITS_CALIB_SIZE = 256
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


@dataclass
class ImageData:
    dataset: Dataset
    kind: str  # "digits" | "imagefolder" | "synthetic"
    num_classes: int | None
    description: str

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _digits_split(n: int, split: str, seed: int = 0) -> torch.Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    if split == "test":
        return test
    if split == "train":
        return train
    if split == "calib":
        return train[:DIGITS_CALIB_SIZE]
    return order


def digits_tensors(input_shape: tuple[int, ...], split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits resized to (C, H, W), scaled to [0, 1] then normalized with mean/std 0.5."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    labels = torch.tensor(raw.target, dtype=torch.long)
    c, h, w = input_shape
    if (h, w) != (8, 8):
        images = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    images = images.expand(-1, c, -1, -1).contiguous()
    images = (images - DIGITS_MEAN) / DIGITS_STD
    idx = _digits_split(len(labels), split)
    return images[idx], labels[idx]


def load_images(
    source: str | Path,
    input_shape: tuple[int, ...],
    split: str = "calib",
    data_config: dict[str, Any] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Open `digits`, `synthetic`, or an ImageFolder directory as an `ImageData`."""
    if split not in SPLITS:
        raise MpdeployError(f"unknown data split {split!r}; use one of {', '.join(SPLITS)}")
    text = str(source)
    if text == "digits":
        x, y = digits_tensors(tuple(input_shape), split)
        data = ImageData(TensorDataset(x, y), "digits", 10, f"scikit-learn digits ({split}, {len(y)} images)")
    elif text == "synthetic":
        n = limit or 64
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *input_shape, generator=gen)
        y = torch.zeros(n, dtype=torch.long)
        data = ImageData(TensorDataset(x, y), "synthetic", None, f"synthetic N(0,1) noise ({n} images; smoke runs only)")
    else:
        data = _image_folder(Path(text), input_shape, data_config or {})
    if limit is not None and len(data) > limit:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
        data.dataset = Subset(data.dataset, idx.tolist())
    return data


def _image_folder(root: Path, input_shape: tuple[int, ...], data_config: dict[str, Any]) -> ImageData:
    if not root.exists():
        raise MpdeployError(f"data directory not found: {root}; pass an ImageFolder tree, `digits` or `synthetic`")
    if not root.is_dir():
        raise MpdeployError(f"{root} is a file; --calib/--data takes an ImageFolder directory (class/image.jpg)")
    try:
        from torchvision.datasets import ImageFolder
    except ImportError:
        raise MpdeployError("ImageFolder data needs torchvision: pip install torchvision") from None
    from timm.data import create_transform

    cfg = dict(data_config)
    cfg["input_size"] = tuple(input_shape)
    transform = create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg.get("mean", (0.485, 0.456, 0.406)),
        std=cfg.get("std", (0.229, 0.224, 0.225)),
        crop_pct=cfg.get("crop_pct", 0.875),
        crop_mode=cfg.get("crop_mode", "center"),
        is_training=False,
    )
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise MpdeployError(
            f"{root} is not an ImageFolder tree ({exc}); lay it out as DIR/<class>/<image>.jpg"
        ) from None
    return ImageData(dataset, "imagefolder", len(dataset.classes), f"ImageFolder {root} ({len(dataset)} images)")


def loader(data: ImageData, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
           persistent_workers: bool = False) -> DataLoader:
    """Batches of `data`; with workers, each holds at most two batches ahead (bounded memory)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {"prefetch_factor": 2, "persistent_workers": persistent_workers} if num_workers > 0 else {}
    return DataLoader(data.dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      **extra)


def input_batches(data: ImageData, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
    for i, (x, _) in enumerate(loader(data, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield x

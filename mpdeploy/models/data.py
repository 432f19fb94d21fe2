"""Calibration, evaluation and distillation data, made the way the model expects its inputs.

Sources: an ImageFolder tree (with the model's own preprocessing: `DataSpec` overrides for mean, std,
resize / crop policy and grayscale / RGB), a file of pre-processed tensors (`.npz` or `.safetensors`
holding `images` [N,C,H,W] and optional `labels`, read without pickle and used as they are), the
built-in digits set, or synthetic noise.

The DataSpec travels in the model's `data_config` (key `data_spec`), which the prune manifest records:
audit and distillation then make their inputs exactly as calibration did.

The digits set (scikit-learn, 1,797 labelled 8x8 images, 10 classes) is the one real labelled set
that ships inside a package; its split is fixed (seeded) so every stage and benchmark sees the same
train / calibration / test images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mpdeploy.core.errors import MpdeployError
from mpdeploy.models.spec import COLORS, CROPS

logger = logging.getLogger(__name__)

SPLITS = ("train", "calib", "test", "all")
DIGITS_TEST_FRACTION = 0.3
DIGITS_CALIB_SIZE = 256
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


TENSOR_SUFFIXES = (".npz", ".safetensors")


@dataclass(frozen=True)
class DataSpec:
    """How ImageFolder images become model inputs; None fields fall back to the model's timm config."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: int | None = None  # shorter side before the centre crop (default: size / crop_pct)
    crop: str = "center"  # center: resize then centre-crop to H,W | resize: resize straight to H,W
    color: str = "auto"  # auto: grayscale for 1-channel models, RGB otherwise
    interpolation: str | None = None  # bilinear | bicubic | nearest

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise MpdeployError(f"--crop must be one of {', '.join(CROPS)}, not {self.crop!r}")
        if self.color not in COLORS:
            raise MpdeployError(f"--color must be one of {', '.join(COLORS)}, not {self.color!r}")
        if self.std is not None and min(self.std) <= 0:
            raise MpdeployError(f"--std values must be positive, not {self.std}")
        if self.resize is not None and not 1 <= self.resize <= 8192:
            raise MpdeployError(f"--resize must be between 1 and 8192 pixels, not {self.resize}")
        if self.interpolation not in (None, "bilinear", "bicubic", "nearest"):
            raise MpdeployError(f"--interpolation must be bilinear, bicubic or nearest, not {self.interpolation!r}")

    @property
    def is_default(self) -> bool:
        return self == DataSpec()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DataSpec:
        if not data:
            return cls()
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise MpdeployError(f"{flag} takes comma-separated numbers, e.g. 0.5 or 0.485,0.456,0.406; not {text!r}") from None
    if not values:
        raise MpdeployError(f"{flag} needs at least one number")
    return values


def data_spec_from_args(args) -> DataSpec:
    return DataSpec(
        mean=_floats(getattr(args, "mean", None), "--mean"),
        std=_floats(getattr(args, "std", None), "--std"),
        resize=getattr(args, "resize", None),
        crop=getattr(args, "crop", None) or "center",
        color=getattr(args, "color", None) or "auto",
        interpolation=getattr(args, "interpolation", None),
    )


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


def digits_split(n: int, split: str, seed: int = 0) -> torch.Tensor:
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
    idx = digits_split(len(labels), split)
    return images[idx], labels[idx]


def load_images(
    source: str | Path,
    input_shape: tuple[int, ...],
    split: str = "calib",
    data_config: dict[str, Any] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Open `digits`, `synthetic`, an .npz / .safetensors of tensors, or an ImageFolder as an `ImageData`.

    The split applies to digits only: a user's file or folder is used whole for whichever stage gets it.
    """
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
    elif Path(text).suffix in TENSOR_SUFFIXES:
        data = _tensor_file(Path(text), tuple(input_shape))
    else:
        data = _image_folder(Path(text), tuple(input_shape), data_config or {})
    if limit is not None and len(data) > limit:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
        data.dataset = Subset(data.dataset, idx.tolist())
    return data


def read_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) from an .npz (np.load, allow_pickle=False) or .safetensors file."""
    import numpy as np

    if not path.is_file():
        raise MpdeployError(f"data file not found: {path}; pass an .npz / .safetensors with `images` [N,C,H,W]")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        else:
            from safetensors.torch import load_file

            arrays = load_file(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MpdeployError(f"{path} is not a readable {path.suffix} tensor file ({type(exc).__name__}: {first}); "
                            "save it with numpy.savez(images=..., labels=...) or safetensors") from None
    if "images" not in arrays:
        raise MpdeployError(f"{path} has no `images` array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    images, labels = arrays["images"], arrays.get("labels")
    if images.dim() != 4 or not images.is_floating_point():
        raise MpdeployError(f"{path}: `images` must be a float array [N,C,H,W], not {images.dtype} "
                            f"{list(images.shape)}")
    if labels is not None and (labels.shape != (images.shape[0],) or labels.is_floating_point()):
        raise MpdeployError(f"{path}: `labels` must be {images.shape[0]} integers, one per image, "
                            f"not {labels.dtype} {list(labels.shape)}")
    check_tensor_values(path, images, labels)
    return images.float(), (labels.long() if labels is not None else None)


def check_tensor_values(path: Path, images: torch.Tensor, labels: torch.Tensor | None,
                        num_classes: int | None = None) -> None:
    """Refuse values no stage can use, before any work (the same line in every stage): NaN / infinite
    pixels, negative labels, and (given the model's `num_classes`) labels past its last output."""
    finite = torch.isfinite(images.float())
    if not bool(finite.all()):
        bad = int((~finite).reshape(len(images), -1).any(dim=1).sum())
        raise MpdeployError(f"{path}: {bad} of {len(images)} images hold NaN or infinite values; "
                            "clean or drop them (every stage needs finite pixels)")
    if labels is None or not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise MpdeployError(f"{path}: labels range {low}..{high} but must be {allowed} (one class index per "
                            "image, the model's own classes)")


def _tensor_file(path: Path, input_shape: tuple[int, ...]) -> ImageData:
    images, labels = read_tensor_file(path)
    if tuple(images.shape[1:]) != input_shape:
        stored = ",".join(map(str, images.shape[1:]))
        raise MpdeployError(
            f"{path} holds images of shape {stored} but the model takes {','.join(map(str, input_shape))} "
            f"(C,H,W); if the model was trained at {stored}, pass --input-shape {stored}, else save the tensors "
            "at the model's input size"
        )
    classes = int(labels.max()) + 1 if labels is not None and len(labels) else None
    y = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
    return ImageData(TensorDataset(images, y), "tensors", classes,
                     f"tensors {path} ({len(images)} images, used as stored{'' if labels is not None else ', no labels'})")


def _transform(input_shape: tuple[int, ...], data_config: dict[str, Any]):
    """(transform, description): the model's own preprocessing, with the DataSpec's overrides."""
    spec = DataSpec.from_dict(data_config.get("data_spec"))
    c, h, w = input_shape
    if spec.is_default and c == 3:
        from timm.data import create_transform

        cfg = {"interpolation": data_config.get("interpolation", "bilinear"),
               "mean": tuple(data_config.get("mean", (0.485, 0.456, 0.406))),
               "std": tuple(data_config.get("std", (0.229, 0.224, 0.225))),
               "crop_pct": data_config.get("crop_pct", 0.875), "crop_mode": data_config.get("crop_mode", "center")}
        transform = create_transform(input_size=tuple(input_shape), is_training=False, **cfg)
        return transform, f"timm eval transform {cfg}"
    from torchvision import transforms as T

    color = spec.color if spec.color != "auto" else ("grayscale" if c == 1 else "rgb")
    if (color == "grayscale") != (c == 1):
        raise MpdeployError(f"--color {color} gives {1 if color == 'grayscale' else 3}-channel images but the model "
                            f"takes {c} channels; pass --color {'grayscale' if c == 1 else 'rgb'}")
    mean = spec.mean or tuple(data_config.get("mean") or (0.5,) * c)
    std = spec.std or tuple(data_config.get("std") or (0.5,) * c)
    if spec.mean is None and len(mean) != c:  # a 1-channel timm model still reports RGB statistics
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, c):
            raise MpdeployError(f"{flag} has {len(values)} values but the model takes {c} channels; give 1 or {c}")
    mean, std = tuple(mean) * (c if len(mean) == 1 else 1), tuple(std) * (c if len(std) == 1 else 1)
    interp = getattr(T.InterpolationMode, (spec.interpolation or data_config.get("interpolation") or "bilinear").upper())
    if spec.crop == "resize":
        geometry = [T.Resize((h, w), interpolation=interp)]
    else:
        short = spec.resize or int(round(min(h, w) / float(data_config.get("crop_pct", 0.875))))
        geometry = [T.Resize(short, interpolation=interp), T.CenterCrop((h, w))]
    mode = "L" if color == "grayscale" else "RGB"
    transform = T.Compose([_Convert(mode), *geometry, T.ToTensor(), T.Normalize(mean, std)])
    how = {"color": color, "crop": spec.crop, "resize": None if spec.crop == "resize" else short, "size": [h, w],
           "interpolation": interp.value, "mean": list(mean), "std": list(std)}
    return transform, f"ImageFolder transform {how}"


class _Convert:
    """PIL mode conversion as a picklable transform (DataLoader workers may pickle the dataset)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"Convert({self.mode})"


def _checked_loader(path: str):
    """PIL loader that names the file it cannot read (one line instead of a PIL traceback)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.copy()
    except Exception as exc:
        raise MpdeployError(f"cannot read image {path} ({type(exc).__name__}); remove or replace the file") from None


def _image_folder(root: Path, input_shape: tuple[int, ...], data_config: dict[str, Any]) -> ImageData:
    if not root.exists():
        raise MpdeployError(f"data directory not found: {root}; pass an ImageFolder tree, an .npz / .safetensors "
                            "of tensors, `digits` or `synthetic`")
    if not root.is_dir():
        raise MpdeployError(f"{root} is a file; pass an ImageFolder directory (class/image.jpg), or an .npz / "
                            ".safetensors holding `images` [N,C,H,W]")
    try:
        from torchvision.datasets import ImageFolder
    except ImportError:
        raise MpdeployError("ImageFolder data needs torchvision: pip install torchvision") from None
    transform, how = _transform(input_shape, data_config)
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=_checked_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        raise MpdeployError(
            f"{root} is not an ImageFolder tree ({exc}); lay it out as DIR/<class>/<image>.jpg"
        ) from None
    return ImageData(dataset, "imagefolder", len(dataset.classes),
                     f"ImageFolder {root} ({len(dataset)} images; {how})")


def shape_from_tensor_sources(sources, input_shape: tuple[int, ...], runs) -> tuple[int, ...]:
    """The input shape to use when none was given: the model's own, unless an .npz / .safetensors data
    source stores images of another C,H,W that the model runs (`runs(shape) -> bool`, a one-image check):
    a model trained at 32x32 whose timm config still says 224 then takes its data's size (logged)."""
    for source in sources:
        path = Path(str(source or ""))
        if path.suffix not in TENSOR_SUFFIXES or not path.is_file():
            continue
        stored = tuple(int(v) for v in read_tensor_file(path)[0].shape[1:])
        if stored != tuple(input_shape) and runs(stored):
            logger.info("input shape %s taken from %s: the model's config says %s, and the model runs %s",
                        ",".join(map(str, stored)), path, ",".join(map(str, input_shape)),
                        ",".join(map(str, stored)))
            return stored
    return tuple(input_shape)


def check_source(source: str | None, input_shape: tuple[int, ...], data_config: dict[str, Any]) -> None:
    """Cheap up-front check of a data source against the model (before any stage runs)."""
    if not source or source in ("digits", "synthetic"):
        return
    path = Path(source)
    if path.suffix in TENSOR_SUFFIXES:
        _tensor_file(path, tuple(input_shape))
    else:
        _image_folder(path, tuple(input_shape), data_config)


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

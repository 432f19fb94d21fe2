"""The project's own models: small timm architectures trained on scikit-learn's digits, shipped with mpdeploy.

They are the embedded default (`mpdeploy build --sparse` with no model) and the models behind the
accuracy benchmarks: real trained weights with a real labelled test split, on any machine, offline.
The weights are files in the package (`mpdeploy/models/zoo_weights/<name>.safetensors`, made once by
`benchmarks/train_zoo.py`), so every machine measures the same model: the registry records each file's
sha256 and its top-1 on the digits test split, and a file that does not match is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "zoo_weights"


@dataclass(frozen=True)
class ZooEntry:
    arch: str  # timm architecture
    kwargs: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, int, int]
    epochs: int
    lr: float
    weight_decay: float
    sha256: str = ""  # of the shipped weights file ("" only for an entry made up for training)
    test_top1: float = 0.0  # its top-1 on the digits test split, as digits_top1 computes it


_REGISTRY: dict[str, ZooEntry] = {
    # 16 patch tokens (+ class token) of 4x4 pixels on digits upsampled to 16x16: small enough to
    # train in minutes on one core; widths are multiples of 16 so every Linear takes 2:4 .. 8:16.
    "digits_vit": ZooEntry(
        "vit_tiny_patch16_224",
        (("img_size", 16), ("patch_size", 4), ("in_chans", 1), ("num_classes", 10),
         ("embed_dim", 128), ("depth", 4), ("num_heads", 4)),
        (1, 16, 16), epochs=30, lr=1e-3, weight_decay=0.05,
        # 503 of 539 test images
        sha256="274c1e4f704779499990eb99cd6ac511959479a9108db1d8d741389c77fb770c", test_top1=0.9332096576690674,
    ),
    "digits_cnn": ZooEntry(
        "resnet10t", (("in_chans", 1), ("num_classes", 10)),
        (1, 32, 32), epochs=15, lr=2e-3, weight_decay=1e-4,
        # 534 of 539 test images
        sha256="94b3a0420e75eda00216e0194782330d14a7390a69dac9d8ffcae1f645fcefcb", test_top1=0.9907235503196716,
    ),
}


def list_zoo_models() -> list[str]:
    return sorted(_REGISTRY)


def zoo_entry(name: str) -> ZooEntry:
    if name not in _REGISTRY:
        raise MpdeployError(f"unknown zoo model {name!r}; choose one of {', '.join(list_zoo_models())}")
    return _REGISTRY[name]


def zoo_weights_path(name: str) -> Path:
    """The shipped weights file of zoo model `name`."""
    zoo_entry(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def zoo_sha256(name: str) -> str:
    """The sha256 the registry records for zoo model `name`'s weights file."""
    return zoo_entry(name).sha256


def create_zoo_model(name: str, trained: bool = True) -> nn.Module:
    """The architecture of zoo model `name`; with trained=True, its shipped weights."""
    entry = zoo_entry(name)
    if trained:
        return load_zoo_model(name).module
    import timm

    return timm.create_model(entry.arch, pretrained=False, **dict(entry.kwargs))


def train_digits(model: nn.Module, entry: ZooEntry, seed: int = 0,
                 progress: Callable[[int, int, float], None] | None = None) -> dict[str, float]:
    """Train on the digits train split (AdamW, cosine schedule, light augmentation by shifts)."""
    from mpdeploy.models.data import digits_tensors

    torch.manual_seed(seed)
    x, y = digits_tensors(entry.input_shape, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=entry.weight_decay)
    steps_per_epoch = (len(y) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=entry.lr, total_steps=entry.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(0.0)
    for epoch in range(entry.epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i : i + 64]
            xb = x[idx]
            # Random shifts of up to 2 pixels: the digits set is small and a ViT overfits it fast.
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1, entry.epochs, loss.item())
    model.eval()
    return {"train_loss": loss.item(), "test_top1": digits_top1(model, entry.input_shape)}


@torch.no_grad()
def digits_top1(model: nn.Module, input_shape: tuple[int, ...], split: str = "test") -> float:
    from mpdeploy.models.data import digits_tensors

    x, y = digits_tensors(tuple(input_shape), split)
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(y), 256)])
    return float((pred == y).float().mean())


def _verified_bytes(name: str, entry: ZooEntry) -> bytes:
    """The shipped weights file's bytes, refused unless their sha256 is the registry's."""
    path = zoo_weights_path(name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MpdeployError(
            f"cannot read zoo model {name}'s weights {path} ({exc.strerror}); reinstall mpdeploy "
            "(`pip install -e .` from the repository) so the package's zoo_weights/ folder is present"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise MpdeployError(
            f"zoo model {name}'s weights {path} have sha256 {digest[:16]}..., not the registry's "
            f"{entry.sha256[:16]}...: the file was changed or damaged; restore it (git checkout, or reinstall mpdeploy)"
        )
    return data


def load_zoo_model(name: str):
    """LoadedModel for zoo model `name`, from its shipped weights (sha256-verified)."""
    from safetensors.torch import load

    from mpdeploy.models.files import load_weights_strict
    from mpdeploy.models.spec import LoadedModel

    entry = zoo_entry(name)
    model = create_zoo_model(name, trained=False)
    path = zoo_weights_path(name)
    load_weights_strict(model, load(_verified_bytes(name, entry)), str(path), name)
    model.eval()
    return LoadedModel(
        module=model,
        input_shape=entry.input_shape,
        name=name,
        source={"kind": "zoo", "name": name, "sha256": entry.sha256},
        data_config={"mean": (0.5,), "std": (0.5,), "input_size": entry.input_shape},
    )

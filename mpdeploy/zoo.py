"""The project's own models: small timm architectures trained here on scikit-learn's digits.

They are the embedded default (`mpdeploy build --sparse` with no model) and the models behind the
accuracy benchmarks: real trained weights with a real labelled test split, on any machine, offline.
Trained on first use (about a minute on 2 CPU cores) and cached under `engines/_zoo/<name>/`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

ZOO_ROOT_ENV = "MPDEPLOY_ZOO_DIR"


@dataclass(frozen=True)
class ZooEntry:
    arch: str  # timm architecture
    kwargs: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, int, int]
    epochs: int
    lr: float
    weight_decay: float


_REGISTRY: dict[str, ZooEntry] = {
    # 16 patch tokens (+ class token) of 4x4 pixels on digits upsampled to 16x16: small enough to
    # train in about a minute on 2 cores; widths are multiples of 16 so every Linear takes 2:4 .. 8:16.
    "digits_vit": ZooEntry(
        "vit_tiny_patch16_224",
        (("img_size", 16), ("patch_size", 4), ("in_chans", 1), ("num_classes", 10),
         ("embed_dim", 128), ("depth", 4), ("num_heads", 4)),
        (1, 16, 16), epochs=30, lr=1e-3, weight_decay=0.05,
    ),
    "digits_cnn": ZooEntry(
        "resnet10t", (("in_chans", 1), ("num_classes", 10)),
        (1, 32, 32), epochs=15, lr=2e-3, weight_decay=1e-4,
    ),
}


def list_zoo_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> ZooEntry:
    if name not in _REGISTRY:
        raise MpdeployError(f"unknown zoo model {name!r}; choose one of {', '.join(list_zoo_models())}")
    return _REGISTRY[name]


def zoo_root() -> Path:
    return Path(os.environ.get(ZOO_ROOT_ENV, "engines/_zoo"))


def create_zoo_model(name: str, trained: bool = True) -> nn.Module:
    """The architecture of zoo model `name`; with trained=True, its cached (or fresh) weights."""
    entry = _entry(name)
    if trained:
        return load_zoo_model(name).module
    import timm

    return timm.create_model(entry.arch, pretrained=False, **dict(entry.kwargs))


def train_digits(model: nn.Module, entry: ZooEntry, seed: int = 0,
                 progress: Callable[[int, int, float], None] | None = None) -> dict[str, float]:
    """Train on the digits train split (AdamW, cosine schedule, light augmentation by shifts)."""
    from mpdeploy.data import digits_tensors

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
    from mpdeploy.data import digits_tensors

    x, y = digits_tensors(tuple(input_shape), split)
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(y), 256)])
    return float((pred == y).float().mean())


def load_zoo_model(name: str, progress: Callable[[int, int, float], None] | None = None):
    """LoadedModel for zoo model `name`, training and caching it on first use."""
    from safetensors.torch import load_file, save_file

    from mpdeploy import artifacts
    from mpdeploy.models import LoadedModel, load_weights_strict

    entry = _entry(name)
    model = create_zoo_model(name, trained=False)
    folder = zoo_root() / name
    config = {"arch": entry.arch, "kwargs": dict(entry.kwargs), "epochs": entry.epochs, "lr": entry.lr,
              "weight_decay": entry.weight_decay, "seed": 0}
    try:
        cached = artifacts.is_complete(folder, "zoo", artifacts.sha256_json(config), {})
        if cached:
            load_weights_strict(model, load_file(str(folder / "model.safetensors")), str(folder), name)
    except PermissionError as exc:
        raise MpdeployError(
            f"cannot read the zoo cache {folder} ({exc.strerror}: {exc.filename}); make it readable "
            f"(chmod -R a+rX {folder}) or point {ZOO_ROOT_ENV} at a folder of your own"
        ) from None
    if not cached:
        logger.info("training zoo model %s on digits (first use; cached in %s)", name, folder)
        metrics = train_digits(model, entry, progress=progress)
        with artifacts.atomic_dir(folder) as tmp:
            state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            # safetensors writes 0600; the cache is shared between users like every other artifact.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp / "model.safetensors", 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            artifacts.write_manifest(tmp, "zoo", config, extra={"metrics": metrics})
        logger.info("zoo model %s: test top-1 %.4f", name, metrics["test_top1"])
    model.eval()
    return LoadedModel(
        module=model,
        input_shape=entry.input_shape,
        name=name,
        source={"kind": "zoo", "name": name},
        data_config={"mean": (0.5,), "std": (0.5,), "input_size": entry.input_shape},
    )

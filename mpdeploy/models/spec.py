"""What a model is before and after loading: its spec, the loaded model, the limits on its input
shape and the preprocessing choices (torch-free: the CLI builds its flags from these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpdeploy.core.errors import MpdeployError

if TYPE_CHECKING:
    from torch import nn

CROPS = ("center", "resize")
COLORS = ("auto", "rgb", "grayscale")
# One image of at most 64 Mi values (e.g. 3x4096x4096) and 1,024 channels: larger is a typo, and would
# fail later as an allocation error deep inside the first forward pass.
MAX_INPUT_VALUES = 1 << 26
MAX_INPUT_CHANNELS = 1024


def bounded_input_shape(dims) -> tuple[int, ...]:
    dims = tuple(int(d) for d in dims)
    values = 1
    for d in dims:
        values *= d
    if dims[0] > MAX_INPUT_CHANNELS or values > MAX_INPUT_VALUES:
        raise MpdeployError(
            f"input shape {','.join(map(str, dims))} is too large ({values:,} values per image; the limit is "
            f"{MAX_INPUT_VALUES:,} and {MAX_INPUT_CHANNELS} channels); pass the size the model was trained at"
        )
    return dims


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `source` is `timm:NAME`, `zoo:NAME`, or a file path."""

    source: str
    arch: str | None = None
    checkpoint: Path | None = None
    input_shape: tuple[int, ...] | None = None  # (C, H, W), without batch
    num_classes: int | None = None
    weights: str = "auto"  # for timm names: auto (pretrained if reachable) | pretrained | random
    trust_pickle: bool = False
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    data_spec: Any = None  # mpdeploy.models.data.DataSpec: how the model's inputs are made from images
    data_sources: tuple[str, ...] = ()  # data the run will use, checked against the model up front


@dataclass
class LoadedModel:
    module: nn.Module
    input_shape: tuple[int, ...]  # (C, H, W)
    name: str
    source: dict[str, Any] = field(default_factory=dict)  # enough to re-create the architecture
    data_config: dict[str, Any] = field(default_factory=dict)  # timm mean/std/interpolation

    @property
    def num_classes(self) -> int | None:
        return getattr(self.module, "num_classes", None)

"""The dtype of the calibration forward passes that feed the layer statistics.

On ViT-B/16 the calibration forward passes are over a third of the default prune's CPU time (issue 26).
Where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) a large model runs them under bfloat16 autocast, as SparseGPT calibrates in half precision on
a GPU. The captured layer inputs are cast back to float32 before any statistic is accumulated, so only
the activations carry bfloat16 rounding; the covariances, the OBS solves and the judge stay float32.
Small models keep float32: their forward pass is cheap, and their results (the method table, the demo)
then do not depend on which CPU ran them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mpdeploy.core.errors import MpdeployError

CALIB_DTYPES = ("auto", "float32", "bfloat16")
# Per-image MACs from which `auto` takes bfloat16 (ResNet-50 4.1 G, ViT-B/16 17.6 G; the zoo's digits
# models and RegNetY-800MF stay float32).
BF16_MIN_MACS = 1_000_000_000


def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 in hardware? (torch exposes the query only as private helpers;
    a torch without them answers no, which keeps float32.)"""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_forward_dtype(requested: str, macs_per_image: int, native: bool) -> tuple[str, str]:
    """(dtype name, why) for `--calib-dtype requested` on a model of `macs_per_image`."""
    if requested not in CALIB_DTYPES:
        raise MpdeployError(f"--calib-dtype {requested!r} is not one of {', '.join(CALIB_DTYPES)}")
    if requested != "auto":
        return requested, f"--calib-dtype {requested}"
    if macs_per_image < BF16_MIN_MACS:
        return "float32", f"auto: {macs_per_image / 1e9:.2f} GMAC per image, under {BF16_MIN_MACS / 1e9:g} G"
    if not native:
        return "float32", "auto: this CPU has no native bfloat16 (AVX512-BF16 / AMX)"
    return "bfloat16", f"auto: {macs_per_image / 1e9:.1f} GMAC per image on a CPU with native bfloat16"


@contextlib.contextmanager
def forward_precision(model: torch.nn.Module, dtype: str) -> Iterator[None]:
    """Forward passes inside run under `dtype` autocast on the model's device (float32: unchanged)."""
    if dtype == "float32":
        yield
        return
    device = next((p.device.type for p in model.parameters()), "cpu")
    with torch.autocast(device, dtype=getattr(torch, dtype)):
        yield


@contextlib.contextmanager
def full_precision(x: torch.Tensor) -> Iterator[None]:
    """A check inside a hook that must compute in float32 whatever autocast the forward pass runs."""
    with torch.autocast(x.device.type, enabled=False):
        yield

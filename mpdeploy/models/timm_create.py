"""timm models by name: created with the user's --model-kwargs, refused in one line when timm rejects them.

Widths past MAX_PARAMETERS are counted on the meta device and refused before any memory is allocated.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def timm_module():
    try:
        import timm
    except ImportError:
        raise MpdeployError("timm is not installed; run `pip install timm` (the README's setup does this)") from None
    return timm


def create_timm_model(name: str, weights: str = "random", **kwargs: Any) -> tuple[nn.Module, str]:
    """Create a timm model; returns (model, what weights it got)."""
    timm = timm_module()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise MpdeployError(f"unknown timm model {name!r}{hint}; see `timm.list_models()` for valid names")
    if weights not in ("auto", "pretrained", "random"):
        raise MpdeployError(f"--weights must be auto, pretrained or random, not {weights!r}")
    if weights == "auto" and not _hub_reachable():
        logger.warning("model hub unreachable; %s gets random init (pass --checkpoint FILE for real weights)", name)
        weights = "random"
    if weights in ("auto", "pretrained"):
        try:
            return timm.create_model(name, pretrained=True, **kwargs), "pretrained"
        except Exception as exc:  # no network, no weights for this tag, hub error
            if kwargs and _rejects_kwargs(exc):
                raise _bad_timm_kwargs(name, kwargs, exc) from None
            if weights == "pretrained":
                raise MpdeployError(
                    f"cannot fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                    "pass --checkpoint FILE with local weights, or --weights random"
                ) from None
            logger.warning("pretrained weights for %s unreachable (%s); using random init", name, type(exc).__name__)
    _check_timm_size(timm, name, kwargs)
    try:
        return timm.create_model(name, pretrained=False, **kwargs), "random"
    except Exception as exc:  # noqa: BLE001 - timm / torch reject the arguments in many ways
        raise _bad_timm_kwargs(name, kwargs, exc) from None


# Absurd widths would be allocated (and initialised) before anything else can refuse them.
MAX_PARAMETERS = 2**31


def _check_timm_size(timm, name: str, kwargs: dict[str, Any]) -> None:
    """Count the parameters on the meta device (no memory) and refuse a model past MAX_PARAMETERS.
    A model that cannot be built on meta is left to the real build (and its own errors)."""
    if not kwargs:
        return
    try:
        with torch.device("meta"), _quiet_warnings():
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - meta is only a pre-check
        return
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise MpdeployError(
            f"timm model {name!r} with --model-kwargs {kwargs} has {count:,} parameters (limit {MAX_PARAMETERS:,}); "
            "check the widths / depths in --model-kwargs"
        )


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rejects_kwargs(exc: Exception) -> bool:
    """An error about the arguments (not about the network or the hub)."""
    return isinstance(exc, (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError, OverflowError,
                            IndexError, KeyError, MemoryError)) and not isinstance(exc, OSError)


def _bad_timm_kwargs(name: str, kwargs: dict[str, Any], exc: Exception) -> MpdeployError:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
    return MpdeployError(
        f"timm model {name!r} cannot be built with {args} ({type(exc).__name__}: {_first_line(exc)}); "
        "fix --model-kwargs / --num-classes (names and values the timm model takes)"
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Cheap probe so `--weights auto` does not sit through the hub client's retries when offline."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False

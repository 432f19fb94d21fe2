"""Find the ONNX initializer that holds each PyTorch parameter (by value first, then by name)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from mpdeploy.core.errors import MpdeployError
from mpdeploy.onnx.trt_rules import tensor_array

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapped:
    initializer: str
    transposed: bool  # the initializer is the 2-D parameter transposed ([in, out])
    method: str  # "value" | "value-transposed" | "value-scaled" | "value-scaled-transposed" | "name"


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _scaled_match(param: np.ndarray, init: np.ndarray) -> bool:
    """`init` is `param` times one factor per output channel (axis 0), as when BatchNorm is folded."""
    p = param.reshape(param.shape[0], -1).astype(np.float64)
    w = init.reshape(init.shape[0], -1).astype(np.float64)
    if np.any((p == 0) & (w != 0)):
        return False
    pp = (p * p).sum(1)
    scale = np.divide((w * p).sum(1), pp, out=np.zeros_like(pp), where=pp > 0)
    err = np.abs(w - scale[:, None] * p).max(initial=0.0)
    return bool(err <= 1e-5 * max(np.abs(w).max(initial=0.0), 1e-12))


def _name_variants(param: str) -> set[str]:
    flat = param.replace(".", "_")
    return {param, flat, f"p_{flat}", f"onnx::{param}"}


def map_initializers(model_proto, params: dict[str, np.ndarray], layers: dict[str, str]) -> dict[str, Mapped]:
    """Find the ONNX initializer holding each parameter, by value first, then by name.

    `params`: parameter name -> fp32 array (PyTorch layout); `layers`: parameter -> layer name (for
    messages). Exact byte equality (as stored, or transposed for 2-D) first; then equality up to one
    factor per output channel (an exporter folded BatchNorm into the weight); then the name.
    """
    import onnx

    inits = {t.name: t for t in model_proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    shapes = {n: tuple(t.dims) for n, t in inits.items()}
    wanted = {tuple(a.shape) for a in params.values()} | {tuple(a.T.shape) for a in params.values() if a.ndim == 2}
    arrays = {n: tensor_array(t) for n, t in inits.items() if shapes[n] in wanted}
    by_digest: dict[str, list[str]] = {}
    for n, arr in arrays.items():
        by_digest.setdefault(_digest(arr), []).append(n)

    mapped: dict[str, Mapped] = {}
    claimed: set[str] = set()

    def pick(param: str, found: list[tuple[str, bool]], method: str) -> bool:
        unique: dict[str, bool] = {}
        for n, t in found:  # a symmetric matrix matches as itself and transposed: keep "itself"
            if n not in claimed:
                unique.setdefault(n, t)
        found = list(unique.items())
        if len(found) > 1:  # equal-valued duplicates: only the name can tell them apart
            named = [(n, t) for n, t in found if n in _name_variants(param)]
            if len(named) != 1:
                names = ", ".join(sorted(n for n, _ in found))
                raise MpdeployError(
                    f"cannot tell which ONNX initializer holds layer {layers.get(param, param)} ({param}): "
                    f"{names} all match its values; re-prune or export with --exporter legacy"
                )
            found = named
        if not found:
            return False
        name, transposed = found[0]
        mapped[param] = Mapped(name, transposed, method + ("-transposed" if transposed else ""))
        claimed.add(name)
        return True

    for param, arr in params.items():
        found = [(n, False) for n in by_digest.get(_digest(arr), [])]
        if arr.ndim == 2:
            found += [(n, True) for n in by_digest.get(_digest(arr.T), [])]
        pick(param, found, "value")
    for param, arr in params.items():
        if param in mapped:
            continue
        found = [(n, False) for n, a in arrays.items() if n not in claimed and a.shape == arr.shape
                 and _scaled_match(arr, a)]
        if arr.ndim == 2:
            found += [(n, True) for n, a in arrays.items() if n not in claimed and a.shape == arr.T.shape
                      and _scaled_match(arr, a.T)]
        # An all-zero initializer (BatchNorm gamma = 0 folded in) "matches" any parameter with scale 0:
        # take one only when nothing with values matches.
        informative = [(n, t) for n, t in found if np.any(arrays[n] != 0)]
        pick(param, informative or found, "value-scaled")
    for param, arr in params.items():
        if param in mapped:
            continue
        found = [(n, False) for n in _name_variants(param) if n in shapes and shapes[n] == arr.shape]
        if pick(param, found, "name"):
            logger.warning("%s: ONNX initializer %s matched by name only (its values differ from the parameter)",
                           param, mapped[param].initializer)
    missing = [p for p in params if p not in mapped]
    if missing:
        names = ", ".join(f"{layers.get(p, p)} ({p})" for p in missing[:5])
        raise MpdeployError(
            f"no ONNX initializer holds the pruned weight of {names}{' ...' if len(missing) > 5 else ''} "
            "(the exporter folded or split it); try the other --exporter"
        )
    return mapped


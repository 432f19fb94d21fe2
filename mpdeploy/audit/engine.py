"""Reading an engine folder, and checking that its pruned weights are still N:M."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.backends import base as backends
from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import engine_backend_present, engine_backends
from mpdeploy.core.names import BACKENDS, VARIANTS

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# reading the engine folder


def check_root(engine_root: Path) -> None:
    if not engine_root.exists():
        raise MpdeployError(f"engine folder not found: {engine_root}; pass engines/<name> as made by mpdeploy build")
    if not engine_root.is_dir():
        raise MpdeployError(f"{engine_root} is a file; pass the engine folder engines/<name>")
    if not engine_backends(engine_root):
        raise MpdeployError(
            f"{engine_root} is not an engine root (no engine-<backend>/ folder inside); "
            "pass engines/<name> after mpdeploy build"
        )


def pick_backend(engine_root: Path, wanted: str | None) -> str:
    if wanted is not None:
        return engine_backend_present(engine_root, wanted)
    present = engine_backends(engine_root)
    known = [b for b in present if b in BACKENDS]
    if not known:
        raise MpdeployError(f"{engine_root}: no engine of a known backend ({', '.join(present)}); rebuild it")
    if len(known) == 1:
        return known[0]
    reasons = []
    for name in known:  # several engines: the first one this machine can run
        ok, why = backends.backend_class(name).availability()
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise MpdeployError(f"none of the engines in {engine_root} can run here ({'; '.join(reasons)}); "
                        "audit them on a machine with the right GPU / libraries")


def engine_files(engine) -> dict[str, Path]:
    """variant -> engine file of an opened (verified) EngineFolder; both variants must be there."""
    files = engine.manifest.get("variants") or {}
    missing = [v for v in VARIANTS if not isinstance(files.get(v), str)]
    if missing:
        raise MpdeployError(
            f"{engine.path}/{artifacts.MANIFEST} names no {' and no '.join(missing)} engine; the audit compares a sparse "
            "engine with its dense twin: rebuild with mpdeploy build --sparse"
        )
    return {v: p for v, p in engine.variant_files().items() if v in VARIANTS}


def io_spec(manifest: Mapping[str, Any], pruned: Mapping[str, Any] | None) -> tuple[tuple[int, ...], int | None,
                                                                                       int | None, dict]:
    """(input C,H,W, fixed batch or None, number of outputs or None, data_config)."""
    io = manifest.get("io") or {}
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    shape = list(inputs[0].get("shape") or []) if inputs else []
    model = (pruned or {}).get("model") or {}
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        chw = tuple(shape[1:])
    elif model.get("input_shape"):
        chw = tuple(model["input_shape"])
    else:
        raise MpdeployError("the engine manifest has no 4-D input shape in io.inputs and no pruned/ folder says it; "
                            "rebuild the engine")
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    out_shape = list(outputs[0].get("shape") or []) if outputs else []
    classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] > 0 else None
    classes = classes or model.get("num_classes")
    return chw, fixed, classes, dict(model.get("data_config") or {})


# ---------------------------------------------------------------------------------------------------
# engine weights: are the pruned layers N:M inside the engine?


def onnx_for_weights(engine, engine_file: Path) -> tuple[Path, str]:
    """The ONNX whose initializers show the engine's weights: the engine file itself, or its onnx source."""
    if engine_file.suffix == ".onnx":
        return engine_file, "the sparse engine file itself"
    return engine.onnx().sparse_model, (f"the ONNX the {engine_file.suffix or 'engine'} file was built from "
                                        "(its weights are not inspectable)")


def _annotations(proto) -> dict[str, dict[str, Any]]:
    import json

    for entry in proto.metadata_props:
        if entry.key == "mpdeploy.sparsity":
            try:
                return dict(json.loads(entry.value).get("tensors") or {})
            except (ValueError, AttributeError):
                return {}
    return {}


def check_engine_weights(onnx_path: Path, layers: Sequence[Mapping[str, Any]],
                         masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Find each pruned layer's weight in the engine ONNX and check its N:M pattern along the reduction axis.

    Found by the exporter's `mpdeploy.sparsity` annotation first; else by the mask: the one initializer of
    the layer's shape (or transposed, for MatMul weights) that is zero wherever the pruned mask is zero
    (this survives renaming and BatchNorm folding, which scales rows but keeps zeros).
    """
    import onnx

    from mpdeploy.onnx.trt_rules import check_trt_sparsity, nm_compliant_along, tensor_array
    from mpdeploy.sparsity.patterns import NM, parse_pattern

    proto = onnx.load(str(onnx_path))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    inits = {t.name: t for t in proto.graph.initializer if t.data_type in float_types}
    annotations = _annotations(proto)
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = tensor_array(inits[name])
        return arrays[name]

    by_param = {a.get("param"): (name, a) for name, a in annotations.items() if name in inits}
    claimed: set[str] = set()
    records = []
    for layer in layers:
        if not layer.get("pattern"):
            continue
        pattern = parse_pattern(layer["pattern"])
        param = layer["param"]
        rec: dict[str, Any] = {"layer": layer["name"], "param": param, "pattern": str(pattern),
                               "runs_sparse": pattern.runs_sparse, "initializer": None, "axis": None,
                               "found_by": None, "nm_compliant": False, "is_2_4": False, "problem": None}
        hit = by_param.get(param)
        if hit is not None:
            rec.update(initializer=hit[0], axis=int(hit[1].get("axis", 1)), found_by="annotation")
        elif param in masks:
            mask = np.asarray(masks[param], dtype=bool)
            # A MatMul holds the Linear weight transposed ([in, out]): its groups run along axis 0.
            shapes = [(mask, 1)] + ([(mask.T, 0)] if mask.ndim == 2 else [])
            same_shape = [(name, m, axis) for name, tensor in inits.items() if name not in claimed
                          for m, axis in shapes if tuple(tensor.dims) == m.shape]
            # Nonzero candidates first; an all-zero weight (BatchNorm with gamma = 0 folded in) matches any
            # mask, so it is taken only when nothing else fits.
            for want_nonzero in (True, False):
                for name, m, axis in same_shape:
                    arr = array(name)
                    if name not in claimed and bool(np.any(arr != 0)) == want_nonzero and not np.any((arr != 0) & ~m):
                        rec.update(initializer=name, axis=axis, found_by="mask" if want_nonzero else "mask (all-zero weight)")
                        break
                if rec["initializer"]:
                    break
            same_shape = [(name, axis) for name, _, axis in same_shape]
            if rec["initializer"] is None:
                nm_anywhere = [n for n, axis in same_shape if nm_compliant_along(array(n), axis, pattern)]
                rec["candidates"] = len(same_shape)
                rec["problem"] = (
                    "an engine weight of this shape is N:M but not with the pruned mask: the engine does not hold "
                    "the pruned weights" if nm_anywhere else
                    f"no engine weight of shape {list(mask.shape)} is {pattern} along the input-channel axis"
                )
        else:
            rec["problem"] = "no mask for this layer in the pruned artifact"
        if rec["initializer"]:
            claimed.add(rec["initializer"])
            arr = array(rec["initializer"])
            rec["shape"] = list(arr.shape)
            rec["nm_compliant"] = nm_compliant_along(arr, rec["axis"], pattern)
            rec["is_2_4"] = nm_compliant_along(arr, rec["axis"], NM(2, 4))
            if not rec["nm_compliant"]:
                rec["problem"] = f"not {pattern} along axis {rec['axis']} (the reduction axis)"
            elif pattern.runs_sparse and not rec["is_2_4"]:
                rec["problem"] = f"{pattern} but not 2:4 along axis {rec['axis']}"
        records.append(rec)
    trt = check_trt_sparsity(proto)
    return {
        "source": str(onnx_path),
        "checked": len(records),
        "ok": sum(r["problem"] is None for r in records),
        "violations": [r for r in records if r["problem"] is not None],
        "tensors": records,
        "trt_rules": {"weights_seen": len(trt), "eligible": sum(v["eligible"] for v in trt.values()),
                      "eligible_and_2_4": sum(v["eligible"] and v["is_2_4"] for v in trt.values())},
    }

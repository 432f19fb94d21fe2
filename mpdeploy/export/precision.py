"""The export stage's precision step: write and check `model.<precision>.onnx` / `model.dense.<precision>.onnx`.

After the FP32 files are written and checked, `--precision fp16|bf16|int8` converts both (see
`mpdeploy.onnx.precision` for how and why) and checks the converted sparse file again: every layer the
pruned manifest runs sparse must still be 2:4 and eligible for TensorRT after the cast or the Q/DQ
insertion, found by its consumer node (ORT's pre-quantization pass renames Conv weights when it folds
BatchNorm in). ONNX Runtime runs each converted file against the FP32 one where its CPU provider has
the kernels (BF16 Conv / pooling it has not: recorded, not run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder
from mpdeploy.onnx.precision import convert, weight_quantization
from mpdeploy.onnx.trt_rules import check_trt_sparsity

logger = logging.getLogger(__name__)

CALIB_BATCH = 16


def calibration_source(config_calib: str | None, pruned_manifest: dict[str, Any]) -> tuple[str, str]:
    """(source, why): --calib, else the pruned artifact's recorded calibration, else digits for the zoo's
    digits models, else synthetic noise (smoke runs only)."""
    if config_calib:
        return config_calib, "--calib"
    recorded = (pruned_manifest.get("config") or {}).get("calib")
    if recorded:
        return str(recorded), "the pruned artifact's calibration source"
    source = (pruned_manifest.get("model") or {}).get("source") or {}
    if source.get("kind") == "zoo" and str(source.get("name", "")).startswith("digits"):
        return "digits", "the zoo model's own data"
    return "synthetic", "no calibration data recorded or given: synthetic noise, INT8 scales meaningless"


def calibration_batches(source: str, manifest: dict[str, Any], images: int) -> tuple[list[np.ndarray], dict]:
    from mpdeploy.models.data import input_batches, load_images

    model = manifest["model"]
    data = load_images(source, tuple(model["input_shape"]), split="calib", data_config=model.get("data_config"),
                       limit=images)
    batches = [x.numpy().astype(np.float32) for x in input_batches(data, CALIB_BATCH)]
    if not batches:
        raise MpdeployError(f"calibration source {source!r} holds no images; pass --calib DIR|digits")
    info = {"source": source, "description": data.description, "images": int(sum(len(b) for b in batches))}
    if data.synthetic:
        info["warning"] = "synthetic calibration data: INT8 scales are meaningless, for smoke runs only"
        logger.warning(info["warning"])
    return batches, info


def _find_converted(records: list[dict], report: dict[str, dict]) -> dict[str, dict | None]:
    """FP32 record initializer -> the converted file's checker entry (same consumer node, else same name)."""
    by_consumer = {v["consumer"]: (k, v) for k, v in report.items() if v.get("consumer")}
    out = {}
    for r in records:
        found = report.get(r["initializer"])
        if found is None and r.get("consumer") in by_consumer:
            found = by_consumer[r["consumer"]][1]
        if found is None:
            found = next((v for k, v in report.items() if k.endswith(r["initializer"])), None)
        out[r["initializer"]] = found
    return out


def _ort_compare(fp32: Path, other: Path, shape: tuple[int, ...], batch: int) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    ref = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    try:
        got = ort.InferenceSession(str(other), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for missing kernels
        message = str(exc).splitlines()[0].replace(str(other.parent) + "/", "")
        return {"run": False, "reason": f"ONNX Runtime CPU cannot run it: {message[:240]}"}
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape or not np.isfinite(got).all():
        raise MpdeployError(f"{other.name}: ONNX Runtime output has shape {got.shape} or non-finite values; "
                            "the conversion broke the model; export --precision fp32 and report this")
    return {"run": True, "batch": batch, "max_abs_diff_vs_fp32": float(np.abs(got - ref).max()),
            "top1_agreement_vs_fp32": float((got.argmax(1) == ref.argmax(1)).mean())}


def write_precision_files(tmp: Path, precision: str, records: list[dict], manifest: dict[str, Any],
                          config) -> dict[str, Any]:
    """Convert both FP32 files in `tmp` to `precision`, check them, return the sparsity.json `precision` record."""
    import onnx

    from mpdeploy.onnx.qdq import qdq_graph_findings

    batches, calib = (None, None)
    if precision == "int8":
        source, why = calibration_source(config.calib, manifest)
        batches, calib = calibration_batches(source, manifest, config.calib_images)
        calib["chosen_because"] = why
    files, conversion = {}, {}
    for variant in ("sparse", "dense"):
        name = OnnxFolder.model_name(variant, precision)
        conversion[variant] = convert(tmp / OnnxFolder.model_name(variant, "fp32"), tmp / name, precision, "input", batches)
        files[variant] = name
    proto = onnx.load(str(tmp / files["sparse"]))
    report = check_trt_sparsity(proto)
    converted = _find_converted(records, report)
    tensors, broken = [], []
    for r in records:
        entry = converted[r["initializer"]]
        ok = bool(entry and entry["eligible"] and entry["is_2_4"])
        tensors.append({"initializer": r["initializer"], "layer": r["layer"], "runs_sparse": r["runs_sparse"],
                        "converted_initializer": next((k for k, v in report.items() if v is entry), None),
                        "dtype": entry["dtype"] if entry else None, "path": entry["path"] if entry else None,
                        "eligible": bool(entry and entry["eligible"]), "is_2_4": ok,
                        "reason": None if ok else (entry["reason"] if entry else "weight not found after conversion")})
        if r["runs_sparse"] and r["eligible"] and r["is_2_4"] and not ok:
            broken.append(tensors[-1])
    if broken:
        t = broken[0]
        raise MpdeployError(f"{precision} conversion lost 2:4 eligibility of {len(broken)} tensors, e.g. {t['layer']} "
                            f"({t['initializer']}): {t['reason']}; export --precision fp32 and report this")
    shape = tuple(manifest["model"]["input_shape"])
    record = {
        "precision": precision,
        "files": files,
        "conversion": conversion,
        "calibration": calib,
        "tensors": tensors,
        "eligible_2_4": sum(t["is_2_4"] for t in tensors if t["runs_sparse"]),
        "ort_check": {v: _ort_compare(tmp / OnnxFolder.model_name(v, "fp32"), tmp / files[v], shape, config.check_batch)
                      for v in files},
    }
    if precision == "int8":
        record["weight_quantization"] = weight_quantization(proto)
        asymmetric = [k for k, v in record["weight_quantization"].items() if not v["symmetric"]]
        if asymmetric:
            raise MpdeployError(f"INT8 weights with a nonzero zero-point ({asymmetric[0]}): zeros would not stay "
                                "zero; this is a quantizer bug, export --precision fp32")
        record["graph_findings"] = qdq_graph_findings(proto)
    return record

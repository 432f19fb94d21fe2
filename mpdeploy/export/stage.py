"""The export stage: `pruned/` artifact -> `onnx/` artifact that carries its sparsity, checked.

Artifact files: `model.onnx` (the pruned model, weights dense-with-zeros), `model.dense.onnx` (the dense
twin, same exporter and graph), `sparsity.json` (per annotated tensor: pattern, the axis TensorRT needs,
eligibility, compliance, how the ONNX initializer was mapped back to its PyTorch parameter; the ONNX
Runtime check), `manifest.json`. Models over 2 GB keep their weights in `model.onnx.data` /
`model.dense.onnx.data`.

ONNX has no N:M annotation, so patterns travel in `metadata_props`: the model-level key
`mpdeploy.sparsity` (JSON), and per initializer where this onnx version's TensorProto has
`metadata_props` (`mpdeploy.nm_pattern`, `mpdeploy.nm_axis`, `mpdeploy.param`).

After every export the ONNX is checked by TensorRT's placement rules (`check_trt_sparsity` in
`mpdeploy.onnx.trt_rules`, the rules Polygraphy's `inspect sparsity` implements) and run in ONNX Runtime
against PyTorch. With `precision` fp16 / bf16 / int8 the stage also writes `model.<precision>.onnx` and
`model.dense.<precision>.onnx` for strongly typed TensorRT builds, checked again (`mpdeploy.export.precision`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.core import artifacts, atomic
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder, open_weights
from mpdeploy.core.names import PRECISIONS
from mpdeploy.onnx.annotate import annotate, round_to_fp16, weights_to_fp16
from mpdeploy.onnx.initializers import Mapped, map_initializers
from mpdeploy.onnx.trt_rules import check_trt_sparsity, nm_compliant_along, tensor_array
from mpdeploy.onnx.from_torch import INPUT_NAME, OUTPUT_NAME, bypass_weight_identities, torch_export
from mpdeploy.sparsity.patterns import parse_pattern

logger = logging.getLogger(__name__)

KIND = "onnx"
SPARSITY_SCHEMA = "mpdeploy.sparsity/1"
EXPORTERS = ("legacy", "dynamo")
# Protobuf cannot serialize a message over 2 GiB: bigger models keep their weights in a .data file.
PROTOBUF_LIMIT = 2**31 - 1
CHECK_SEED = 0


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    dynamic_batch: bool = True
    fp16: bool = False  # FP16 weight initializers behind Cast-to-FP32 nodes; I/O and math stay FP32
    exporter: str = "legacy"  # "legacy": torch.onnx.export(dynamo=False); "dynamo": dynamo=True
    allow_ineligible: bool = False
    check_batch: int = 2  # ONNX Runtime check batch (plus 1, for a dynamic batch); a static export has batch 1
    atol: float = 1e-4
    # fp16 / bf16 / int8 also write model.<precision>.onnx and model.dense.<precision>.onnx (mpdeploy.onnx.precision)
    precision: str = "fp32"
    calib: str | None = None  # int8 calibration: DIR | digits | synthetic; default: the pruned artifact's own
    calib_images: int = 128

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MpdeployError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.calib_images < 1:
            raise MpdeployError(f"calibration images must be at least 1, not {self.calib_images}")
        if self.exporter not in EXPORTERS:
            raise MpdeployError(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        if not 14 <= int(self.opset) <= 23:
            raise MpdeployError(f"--opset {self.opset} is out of range; use 14..23 (18 is the default)")
        if self.exporter == "dynamo" and self.opset < 18:
            raise MpdeployError(f"the dynamo exporter needs --opset 18 or newer, not {self.opset}")
        if self.check_batch < 1:
            raise MpdeployError(f"check batch must be at least 1, not {self.check_batch}")
        if not self.atol > 0:
            raise MpdeployError(f"atol must be positive, not {self.atol}")


# ---------------------------------------------------------------------------------------------------
# saving and checking


def _initializer_bytes(model_proto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model_proto.graph.initializer)


def _save(model_proto, path: Path) -> None:
    import onnx

    if _initializer_bytes(model_proto) > PROTOBUF_LIMIT - (64 << 20):
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))
    onnx.checker.check_model(str(path))


def _export_one(model, input_shape, config: ExportConfig, work: Path, name: str):
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw.onnx"
    torch_export(model, input_shape, config, raw, name)
    proto = onnx.load(str(raw))  # pulls any external data into memory
    shutil.rmtree(work, ignore_errors=True)
    dropped = bypass_weight_identities(proto)
    if dropped:
        logger.debug("dropped %d Identity nodes in front of initializers", dropped)
    return proto


def _ort_max_diff(path: Path, model, input_shape, batches: list[int]) -> float:
    """Largest |ONNX Runtime (CPU) - PyTorch| over random inputs of each batch size."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in batches:
        generator = torch.Generator().manual_seed(CHECK_SEED + batch)
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = model(x).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise MpdeployError(f"{path.name}: ONNX Runtime returned shape {got.shape}, PyTorch {expected.shape}")
        # NaN must fail the check, so it is carried rather than dropped by max().
        diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
        worst = diff if np.isnan(diff) else max(worst, diff)
    return worst


# ---------------------------------------------------------------------------------------------------
# the stage


def _tensor_records(proto, pruned, mapped: dict[str, Mapped], trt: dict[str, dict]) -> list[dict[str, Any]]:
    inits = {t.name: t for t in proto.graph.initializer}
    records = []
    for layer in pruned.manifest["layers"]:
        if not layer.get("pattern") or layer["param"] not in mapped:
            continue
        pattern = parse_pattern(layer["pattern"])
        m = mapped[layer["param"]]
        # N:M groups run along PyTorch axis 1 (input channels); a transposed 2-D copy has them on axis 0.
        annotation_axis = 0 if m.transposed else 1
        check = trt.get(m.initializer)
        nm_ok = nm_compliant_along(tensor_array(inits[m.initializer]), annotation_axis, pattern)
        eligible = bool(check and check["eligible"])
        is_24 = bool(check and check["is_2_4"])
        if check is None:
            reason = "not reached from a Conv / MatMul / Gemm weight input"
        elif not pattern.runs_sparse:
            reason = "audit-only (no sparse tensor core path)"
            if check["reason"]:
                reason += f"; {check['reason']}"
        else:
            reason = check["reason"]
        records.append({
            "initializer": m.initializer, "param": layer["param"], "layer": layer["name"], "pattern": str(pattern),
            "runs_sparse": pattern.runs_sparse, "consumer_op": check["consumer_op"] if check else None,
            "consumer": check["consumer"] if check else None, "path": check["path"] if check else [],
            "axis": check["axis"] if check else None, "annotation_axis": annotation_axis, "eligible": eligible,
            "is_2_4": is_24, "nm_compliant": nm_ok, "reason": reason, "map_method": m.method,
            "shape": list(inits[m.initializer].dims),
        })
    return records


def _refuse_broken(records: list[dict[str, Any]], config: ExportConfig) -> list[dict[str, Any]]:
    """Fail on a tensor that lost its N:M zeros; fail (or, allowed, warn) on sparse layers TensorRT cannot use.
    Returns the ineligible records."""
    broken = [r for r in records if not r["nm_compliant"]]
    if broken:
        r = broken[0]
        raise MpdeployError(
            f"{r['layer']}: ONNX initializer {r['initializer']} is not {r['pattern']} along axis "
            f"{r['annotation_axis']} ({len(broken)} such tensors); the pruned artifact or the exporter changed "
            "the weights: re-run `mpdeploy prune`"
        )
    ineligible = [r for r in records if r["runs_sparse"] and not (r["eligible"] and r["is_2_4"])]
    if ineligible:
        lines = "; ".join(f"{r['layer']} ({r['initializer']}): {r['reason']}" for r in ineligible[:3])
        more = f" and {len(ineligible) - 3} more" if len(ineligible) > 3 else ""
        if not config.allow_ineligible:
            raise MpdeployError(
                f"{len(ineligible)} layers pruned to a sparse-tensor-core pattern are not 2:4-eligible for "
                f"TensorRT in the ONNX: {lines}{more}; pass --allow-ineligible to export anyway"
            )
        logger.warning("%d pruned layers not 2:4-eligible for TensorRT: %s%s", len(ineligible), lines, more)
    return ineligible


def _ort_check(tmp: Path, sparse, dense, config: ExportConfig) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on both files (at the check batch, and batch 1 for a dynamic batch)."""
    batches = [config.check_batch] if config.dynamic_batch else [1]
    if config.dynamic_batch and config.check_batch != 1:
        batches.append(1)  # proves the batch axis really is dynamic
    diffs = {}
    for variant, art in (("sparse", sparse), ("dense", dense)):
        file = OnnxFolder.MODELS[variant]
        reference = round_to_fp16(art.model) if config.fp16 else art.model
        diffs[variant] = _ort_max_diff(tmp / file, reference, sparse.input_shape, batches)
    for variant, diff in diffs.items():
        if not diff < config.atol:  # also catches NaN
            raise MpdeployError(
                f"{sparse.name}: ONNX Runtime output of the {variant} model differs from PyTorch by {diff:.3g} "
                f"(atol {config.atol:g}); try the other --exporter or a larger atol"
            )
    return {"max_abs_diff_sparse": diffs["sparse"], "max_abs_diff_dense": diffs["dense"], "atol": config.atol,
            "batch": batches[0], "batches": batches, "provider": "CPUExecutionProvider"}


def _summary(records, ineligible, trt) -> dict[str, Any]:
    return {
        "annotated": len(records),
        "runs_sparse": sum(r["runs_sparse"] for r in records),
        "eligible_2_4": sum(r["eligible"] and r["is_2_4"] for r in records),
        "audit_only": sum(not r["runs_sparse"] for r in records),
        "ineligible": [{"initializer": r["initializer"], "layer": r["layer"], "reason": r["reason"]}
                       for r in ineligible],
        "checker_eligible": sum(v["eligible"] for v in trt.values()),
        "checker_2_4": sum(v["eligible"] and v["is_2_4"] for v in trt.values()),
    }


def _sparsity_record(config: ExportConfig, source_hash: str, per_tensor: bool, records, trt, annotations,
                     ort_check, summary, precision) -> dict[str, Any]:
    return {
        "schema": SPARSITY_SCHEMA,
        "exporter": config.exporter,
        "opset": config.opset,
        "source_pruned_manifest_sha256": source_hash,
        "fp16_weights": bool(config.fp16),
        "fp16_note": ("2+-D FP32 initializers stored as FP16 behind Cast-to-FP32; I/O and math FP32; "
                      "ORT compared with the PyTorch model with those tensors rounded through FP16")
        if config.fp16 else None,
        "per_tensor_metadata": {
            "written": per_tensor,
            "note": "TensorProto.metadata_props keys mpdeploy.nm_pattern / mpdeploy.nm_axis / mpdeploy.param"
            if per_tensor else "this onnx version's TensorProto has no metadata_props; model-level JSON only",
        },
        "tensors": records,
        "unannotated_checked": {k: {kk: v[kk] for kk in ("consumer_op", "axis", "eligible", "is_2_4", "reason")}
                                for k, v in trt.items() if k not in annotations},
        "ort_check": ort_check,
        "summary": summary,
        "precision": precision,
    }


def _check_output(out_dir: Path, pruned_dir: Path) -> None:
    src, dst = Path(pruned_dir).resolve(), Path(out_dir).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise MpdeployError(f"--out {out_dir} overlaps the pruned artifact {pruned_dir}; choose a sibling folder")


def export(pruned_dir: Path, config: ExportConfig, out_dir: Path) -> Path:
    """Export the pruned artifact (and its dense twin) to ONNX, annotate, check, write `out_dir/`."""
    import torch

    from mpdeploy import __version__
    from mpdeploy.sparsity.pruned import load_pruned

    pruned_dir, out_dir = Path(pruned_dir), Path(out_dir)
    open_weights(pruned_dir)  # bad input (a file, its chain, a missing source) fails before anything is made
    _check_output(out_dir, pruned_dir)
    source_hash = artifacts.manifest_hash(pruned_dir)
    timings: dict[str, float] = {}
    with artifacts.atomic_dir(out_dir, kind=KIND) as tmp:
        sparse = load_pruned(pruned_dir, "sparse", verify=False)
        dense = load_pruned(pruned_dir, "dense", verify=False)
        shape, name = sparse.input_shape, sparse.name

        t0 = time.perf_counter()
        proto = _export_one(sparse.model, shape, config, tmp / ".work", name)
        timings["export_sparse_s"] = time.perf_counter() - t0

        patterns = sparse.patterns()
        params = {n: p.detach().float().cpu().numpy() for n, p in sparse.model.named_parameters() if n in patterns}
        layers = {r["param"]: r["name"] for r in sparse.manifest["layers"]}
        mapped = map_initializers(proto, params, layers)
        fp16 = weights_to_fp16(proto) if config.fp16 else []

        t0 = time.perf_counter()
        trt = check_trt_sparsity(proto)
        records = _tensor_records(proto, sparse, mapped, trt)
        timings["check_s"] = time.perf_counter() - t0
        ineligible = _refuse_broken(records, config)

        header = {"schema": SPARSITY_SCHEMA, "tool": "mpdeploy", "version": __version__,
                  "source_pruned_manifest_sha256": source_hash}
        annotations = {r["initializer"]: {"param": r["param"], "pattern": r["pattern"], "axis": r["annotation_axis"]}
                       for r in records}
        per_tensor = annotate(proto, annotations, {**header, "variant": "sparse"})
        _save(proto, tmp / OnnxFolder.MODELS["sparse"])
        del proto

        t0 = time.perf_counter()
        dense_proto = _export_one(dense.model, shape, config, tmp / ".work", name)
        if config.fp16:
            weights_to_fp16(dense_proto)
        annotate(dense_proto, {}, {**header, "variant": "dense"})
        _save(dense_proto, tmp / OnnxFolder.MODELS["dense"])
        del dense_proto
        timings["export_dense_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ort_check = _ort_check(tmp, sparse, dense, config)
        timings["ort_check_s"] = time.perf_counter() - t0
        precision = None
        if config.precision != "fp32":
            from mpdeploy.export.precision import write_precision_files

            t0 = time.perf_counter()
            precision = write_precision_files(tmp, config.precision, records, sparse.manifest, config)
            timings[f"{config.precision}_s"] = time.perf_counter() - t0

        summary = _summary(records, ineligible, trt)
        sparsity = _sparsity_record(config, source_hash, per_tensor, records, trt, annotations, ort_check, summary,
                                    precision)
        atomic.write_json(tmp / OnnxFolder.SPARSITY, sparsity)
        artifacts.write_manifest(
            tmp, KIND, config, inputs={"pruned_manifest": source_hash}, sources={"weights": pruned_dir},
            extra={
                "model": {**sparse.manifest["model"], "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                          "dynamic_batch": config.dynamic_batch},
                "tome": sparse.manifest.get("tome"),
                "summary": {k: v for k, v in summary.items() if k != "ineligible"},
                "ort_check": ort_check,
                "fp16_initializers": len(fp16),
                "precision": config.precision,
                "precision_files": (precision or {}).get("files"),
                "timings": timings,
                "torch_version": torch.__version__,
            },
        )
    logger.info("exported %s: %d annotated tensors, %d eligible 2:4 -> %s", name, summary["annotated"],
                summary["eligible_2_4"], out_dir)
    return out_dir


def load_sparsity(onnx_dir: Path, verify: bool = True) -> dict[str, Any]:
    """Read a checked `onnx/` artifact's sparsity.json (the manifest, and with `verify` its hashes, first)."""
    onnx_dir = Path(onnx_dir)
    return OnnxFolder.open(onnx_dir, verify=verify).sparsity()

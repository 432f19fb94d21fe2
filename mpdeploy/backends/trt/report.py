"""What a TensorRT build did about sparsity, from its verbose log and its engine inspector (pure parsing).

TensorRT prints two lines at the end of a verbose build with `SPARSE_WEIGHTS` set (TensorRT developer
guide, "Structured Sparsity"; also quoted in NVIDIA/TensorRT issues #2169 and #4054):

    [03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
    [03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3

Layer names are TensorRT's (fused layers read "Conv_619 + Relu_620"; TensorRT 10 names carry the ONNX
node names, Myelin regions read "{ForeignNode[first...last]}"). The engine inspector
(`IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`, ProfilingVerbosity.DETAILED)
gives `{"Layers": [...], "Bindings": [...]}` (TensorRT 11: "I/O Tensors" instead of "Bindings") with per-layer `Name`, `LayerType`, `TacticName`,
`TacticValue`, `Weights`, and `HasSparseWeights` (older releases: `AllowSparse`).

Nothing here imports TensorRT: the parsers run on CPU and are tested on text in those formats.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mpdeploy.core.kinds import OnnxFolder


ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"
# A new log record starts with "[" (trtexec "[03/23/2021-...]", Polygraphy "[V]") or the next marker.
_RECORD_START = re.compile(r"^\s*(\[|\(Sparsity\))")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
_PROFILE_SUFFIX = re.compile(r"\s*\[profile (\d+)\]")
# Sparse tensor-core kernels carry "sparse" / "sptensor" in their names (e.g. *_sparse_conv_*, *_sptensor16x8x32_*).
_SPARSE_TACTIC = re.compile(r"sparse|sptensor", re.IGNORECASE)
SMALL_BATCH = 4  # batches at or below this rarely gain from sparse kernels (too little work per weight)
NEITHER_LINE = ("neither sparsity line appears: the build log has no '(Sparsity) Layers eligible for sparse math' line "
                "and no '(Sparsity) TRT inference plan picked sparse implementation' line (the logger was not verbose, "
                "SPARSE_WEIGHTS was off, or this TensorRT no longer prints them: whether TensorRT 11 does is not "
                "confirmed by any public log); sparse use is judged from the engine inspector's HasSparseWeights and "
                "tactic names only")


def _split_layers(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    # ", " separates layers; a comma inside {ForeignNode[...]} or (...) does not.
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return [name for name in out if name]


def _after_marker(lines: list[str], i: int, marker: str) -> str:
    """The text after `marker` on line i, joined with wrapped continuation lines (pasted terminal logs)."""
    text = lines[i].split(marker, 1)[1]
    for nxt in lines[i + 1 :]:
        if not nxt.strip() or _RECORD_START.match(nxt):
            break
        text += nxt.strip("\r\n")  # a terminal wrap splits mid-name: join without a separator
    return text


def parse_sparsity_log(text: str) -> dict[str, list[str] | None]:
    """{"eligible": [layers] | None, "picked_sparse": [layers] | None} from a TensorRT build log.

    None means the line is absent (no SPARSE_WEIGHTS, or the log was not verbose enough); [] means
    TensorRT printed it with no layers. With several builds in one log the last pair wins.
    """
    result: dict[str, list[str] | None] = {"eligible": None, "picked_sparse": None}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if ELIGIBLE_MARKER in line:
            result["eligible"] = _split_layers(_after_marker(lines, i, ELIGIBLE_MARKER))
        elif PICKED_MARKER in line:
            result["picked_sparse"] = _split_layers(_after_marker(lines, i, PICKED_MARKER))
    return result


def _onnx_nodes(metadata: Any) -> list[str]:
    if not isinstance(metadata, str):
        return []
    return [m.strip() for m in _ONNX_LAYER.findall(metadata)]


def _precision(layer: dict[str, Any]) -> str | None:
    outputs = layer.get("Outputs") or []
    if outputs and isinstance(outputs[0], dict):
        # TensorRT 11 splits "Format/Datatype" into "Datatype" and "Format" (as Polygraphy's inspector reads it).
        fmt = str(outputs[0].get("Format/Datatype") or outputs[0].get("Datatype") or "")
        fmt = fmt.lower()
        # "Row major linear FP16 format", "Half", "Thirty-two wide ... Int8 format.", "Float", ...
        for words, name in ((("int8",), "INT8"), (("bfloat16", "bf16"), "BF16"), (("fp8",), "FP8"),
                            (("half", "fp16"), "FP16"), (("float", "fp32"), "FP32")):
            if any(word in fmt for word in words):
                return name
    return None


def _flag(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def parse_engine_inspector(info: str | dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer {name, type, parameter_type, tactic, tactic_value, has_sparse_weights, sparse_tactic,
    precision, weights, onnx_nodes, profile}. Accepts the JSON text or the parsed object.

    With ProfilingVerbosity.LAYER_NAMES_ONLY the layers are bare strings: only `name` is known.
    `has_sparse_weights` is None where the engine does not say; `sparse_tactic` is a name heuristic.
    """
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if isinstance(data, dict):
        raw_layers = data.get("Layers", [])
    elif isinstance(data, list):
        raw_layers = data
    else:
        raise ValueError(f"engine information is not a JSON object or list ({type(data).__name__})")
    layers = []
    for raw in raw_layers:
        if isinstance(raw, str):
            raw = {"Name": raw}
        if not isinstance(raw, dict):
            continue
        name = str(raw.get("Name", ""))
        profile = _PROFILE_SUFFIX.search(name)
        tactic = raw.get("TacticName")
        sparse_flag = raw.get("HasSparseWeights", raw.get("AllowSparse"))
        weights = raw.get("Weights") if isinstance(raw.get("Weights"), dict) else None
        layers.append({
            "name": name,
            "type": raw.get("LayerType"),
            "parameter_type": raw.get("ParameterType"),
            "tactic": tactic,
            "tactic_value": raw.get("TacticValue"),
            "has_sparse_weights": _flag(sparse_flag),
            "sparse_tactic": bool(tactic and _SPARSE_TACTIC.search(str(tactic))),
            "precision": _precision(raw),
            "weights": weights,
            "onnx_nodes": _onnx_nodes(raw.get("Metadata")),
            "profile": int(profile.group(1)) if profile else 0,
        })
    return layers


def parse_engine_io(info: str | dict[str, Any]) -> dict[str, Any]:
    """The engine's I/O tensors from the inspector JSON: TensorRT 10 calls the list "Bindings" (names), TensorRT
    11 "I/O Tensors" (objects with Name / Mode / Datatype / Dimensions). Returns {"key", "tensors": [{name,
    mode, dtype, shape}]}; key None when neither is present."""
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if not isinstance(data, dict):
        return {"key": None, "tensors": []}
    for key in ("I/O Tensors", "Bindings"):
        if key in data:
            tensors = []
            for raw in data.get(key) or []:
                if isinstance(raw, str):
                    tensors.append({"name": raw, "mode": None, "dtype": None, "shape": None})
                elif isinstance(raw, dict):
                    tensors.append({"name": raw.get("Name"), "mode": raw.get("Mode") or raw.get("IOMode"),
                                    "dtype": raw.get("Datatype") or raw.get("DataType"),
                                    "shape": raw.get("Dimensions") or raw.get("Shape")})
            return {"key": key, "tensors": tensors}
    return {"key": None, "tensors": []}


def _parts(layer_name: str) -> list[str]:
    """The ONNX-level names inside a (possibly fused) TensorRT layer name."""
    return [p.strip() for p in layer_name.split(" + ") if p.strip()]


def _mentions(layer_names: list[str], node: str) -> bool:
    return any(node == part or node in part for name in layer_names for part in _parts(name))


def layer_not_sparse_reasons(report: dict[str, Any]) -> list[dict[str, str]]:
    """For each eligible layer TensorRT did not run sparse: the reason that can be given."""
    eligible = report.get("eligible") or []
    picked = set(report.get("picked_sparse") or [])
    by_name = {layer["name"]: layer for layer in report.get("layers") or []}
    out = []
    for name in eligible:
        if name in picked:
            continue
        layer = by_name.get(name)
        reason = "TensorRT timed sparse and dense tactics and kept the faster dense one"
        if layer and layer.get("tactic"):
            reason += f" ({layer['tactic']})"
        out.append({"layer": name, "reason": reason})
    return out


def pitfall_warnings(report: dict[str, Any], sparsity_json: dict[str, Any] | None = None) -> list[str]:
    """Name the known ways a "sparse" engine ends up not sparse (tensorrt.md), from one variant's report.

    `report`: {"eligible", "picked_sparse" (from parse_sparsity_log), "layers" (parse_engine_inspector),
    "precision", "sparse_weights" (the flag), "batch_sizes"}; `sparsity_json`: the export's sparsity.json.
    """
    warnings: list[str] = []
    eligible, picked = report.get("eligible"), report.get("picked_sparse")
    layers = report.get("layers") or []
    precision = str(report.get("precision") or "").lower()
    sparse_flag = bool(report.get("sparse_weights", True))
    tensors = (sparsity_json or {}).get("tensors") or []
    annotated = [t for t in tensors if t.get("runs_sparse", True)]

    if not sparse_flag:
        return warnings
    if precision == "fp32":
        warnings.append("precision fp32: TensorRT runs sparse math only in FP16/BF16/INT8, so SPARSE_WEIGHTS does "
                        "nothing here; build with --precision fp16 (or int8)")
    if eligible is None and picked is None:
        warnings.append(NEITHER_LINE)
    elif eligible is None:
        warnings.append("the build log has no '(Sparsity) Layers eligible for sparse math' line: the logger was not "
                        "verbose or SPARSE_WEIGHTS was not set, so eligibility is unknown")
    else:
        not_picked = [name for name in eligible if name not in set(picked or [])]
        if eligible and not_picked:
            shown = ", ".join(not_picked[:5]) + (f" and {len(not_picked) - 5} more" if len(not_picked) > 5 else "")
            warnings.append(f"eligible but not picked: {len(not_picked)} of {len(eligible)} eligible layers run dense "
                            f"kernels because TensorRT timed them faster ({shown}); sparse kernels tend to win only "
                            "when input and output channels are large (roughly >= 256)")
        if eligible and picked is not None and not picked:
            warnings.append("TensorRT picked no sparse implementation at all: expect no speedup from 2:4 in this engine")
        if annotated and not eligible:
            warnings.append(f"{len(annotated)} tensors are annotated 2:4 but TensorRT found no layer eligible for sparse "
                            "math (weights reaching MatMul through Reshape/Concat/..., or a non-constant weight input)")
        foreign = [name for name in eligible + list(picked or []) if "ForeignNode" in name]
        if foreign:
            warnings.append(f"{len(foreign)} Myelin-fused regions ({{ForeignNode[...]}}) are listed: which MatMuls "
                            "inside them run sparse cannot be told per layer from the log")
        elif eligible:
            missing = [t for t in annotated if t.get("eligible") and t.get("is_2_4") and t.get("consumer")
                       and not _mentions(eligible, t["consumer"])]
            if missing:
                names = ", ".join(f"{t.get('layer') or t['initializer']} ({t['consumer']})" for t in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                warnings.append(f"annotated 2:4 and eligible by the ONNX check, but not in TensorRT's eligible list: "
                                f"{names}{more}; TensorRT may have folded the weight through a Shuffle/Reshape")
    ineligible = [t for t in annotated if not (t.get("eligible") and t.get("is_2_4"))]
    if ineligible:
        t = ineligible[0]
        warnings.append(f"annotated 2:4 but not eligible in the ONNX: {len(ineligible)} tensors, e.g. "
                        f"{t.get('layer') or t.get('initializer')}: {t.get('reason') or f'see {OnnxFolder.SPARSITY}'}")
    dense_with_sparse = [layer for layer in layers if layer.get("has_sparse_weights") and not layer.get("sparse_tactic")]
    qdq = precision == "int8" or any("QuantizeLinear" in p or "DequantizeLinear" in p
                                     for t in tensors for p in (t.get("path") or []))
    if dense_with_sparse and qdq:
        names = ", ".join(layer["name"] for layer in dense_with_sparse[:3])
        warnings.append(f"INT8: {len(dense_with_sparse)} layers report sparse weights (HasSparseWeights=1) but run "
                        f"dense kernels ({names}); a known INT8/Q-DQ behaviour, check the tactics in the inspector")
    batches = [int(b) for b in report.get("batch_sizes") or []]
    if batches and min(batches) <= SMALL_BATCH:
        warnings.append(f"tiny batch sizes ({', '.join(map(str, batches))}): at batch <= {SMALL_BATCH} sparse kernels are "
                        "often slower than dense; compare the audit's per-batch latency, not one number")
    return warnings


"""Which pruned layers an engine really ran sparse, from its own report (pure functions, no GPU).

    TensorRT  the build log's picked list ("(Sparsity) TRT inference plan picked sparse implementation
              for layers: ..."), matched to PyTorch layers through the ONNX node that consumes each
              pruned weight (sparsity.json) and the inspector's per-layer ONNX nodes; without that
              line, the inspector's sparse tactic names (a name heuristic, said so)
    torch     the torch engine's converted list (its conversion plan, computable on CPU)
    slow      layers whose sparse kernel timed slower than dense on a GPU (a file, e.g. from
              benchmarks/torch_sparse_speed.py): they ran sparse, and it did not pay

A layer that cannot be matched (inside a Myelin {ForeignNode[...]} region) is `unknown` and keeps its
sparse weights: densify gives back only what the report shows ran dense.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder

_PROFILE_SUFFIX = re.compile(r"\s*\[profile \d+\]\s*$")
NOT_PICKED = "eligible, but TensorRT timed sparse and dense kernels and kept the dense one"
NOT_ELIGIBLE = "not in TensorRT's eligible list: it ran dense kernels"
SLOW = "its sparse kernel timed slower than dense on the GPU"


@dataclass
class Evidence:
    """What one engine report says about the pruned layers (PyTorch layer names)."""

    source: str  # where it was read: "tensorrt build log (picked list)", "torch converted list", ...
    ran_sparse: list[str] = field(default_factory=list)
    ran_dense: dict[str, str] = field(default_factory=dict)  # layer -> why it ran dense
    unknown: dict[str, str] = field(default_factory=dict)  # layer -> why it cannot be told (kept sparse)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "ran_sparse": sorted(self.ran_sparse), "ran_dense": dict(self.ran_dense),
                "unknown": dict(self.unknown)}


def sparse_layer_names(layers: list[dict[str, Any]]) -> list[str]:
    """The layers of a pruned manifest pruned to a pattern sparse kernels run (the ones densify can give back)."""
    return [r["name"] for r in layers if r.get("pattern") and r.get("runs_sparse")]


def _onnx_parts(trt_name: str) -> set[str]:
    """The ONNX node names inside a (possibly fused) TensorRT layer name: "Conv_3 + Relu_4 [profile 0]"."""
    return {p.strip() for p in _PROFILE_SUFFIX.sub("", trt_name).split(" + ") if p.strip()}


def _nodes_of(trt_names: list[str], inspector: list[dict[str, Any]]) -> set[str]:
    """Every ONNX node a list of TensorRT layers covers: from the names, and the inspector's metadata."""
    wanted = {_PROFILE_SUFFIX.sub("", n) for n in trt_names}
    nodes = set().union(*(_onnx_parts(n) for n in trt_names)) if trt_names else set()
    for layer in inspector:
        if _PROFILE_SUFFIX.sub("", str(layer.get("name", ""))) in wanted:
            nodes.update(layer.get("onnx_nodes") or [])
    return nodes


def _trt_picked(report: dict[str, Any]) -> tuple[list[str], str]:
    """(TensorRT layers that ran sparse, where that was read); refuses a report that does not say."""
    if report.get("picked_sparse") is not None:
        return list(report["picked_sparse"]), "tensorrt build log (picked list)"
    layers = report.get("layers") or []
    if any(layer.get("tactic") for layer in layers):
        return ([layer["name"] for layer in layers if layer.get("sparse_tactic")],
                "tensorrt engine inspector (sparse tactic names: a name heuristic, no picked list in the log)")
    raise MpdeployError("the TensorRT report does not say which layers ran sparse (no '(Sparsity) ... picked' log "
                        "line, no inspector tactics); rebuild the engine with a verbose log, or pass --trt-log FILE")


def trt_evidence(report: dict[str, Any], tensors: list[dict[str, Any]], pruned: list[str]) -> Evidence:
    """Which `pruned` layers the TensorRT engine ran sparse.

    `report`: the sparse variant's build report ({"eligible", "picked_sparse"} from the log, "layers"
    from the inspector); `tensors`: the export's sparsity.json records ({"layer", "consumer", ...})."""
    picked, source = _trt_picked(report)
    eligible = report.get("eligible")
    inspector = report.get("layers") or []
    picked_nodes = _nodes_of(picked, inspector)
    eligible_nodes = _nodes_of(list(eligible or []), inspector)
    myelin = [n for n in [*picked, *(eligible or [])] if "ForeignNode" in n]
    # Without an eligible list, only the inspector says which nodes the engine has at all.
    known = _nodes_of([str(x.get("name", "")) for x in inspector], inspector) if eligible is None else None
    consumer = {t["layer"]: t.get("consumer") for t in tensors if t.get("layer")}
    evidence = Evidence(source)
    for layer in pruned:
        node = consumer.get(layer)
        if node is None:
            evidence.unknown[layer] = f"no ONNX consumer recorded for it in {OnnxFolder.SPARSITY}"
        elif node in picked_nodes:
            evidence.ran_sparse.append(layer)
        elif node in eligible_nodes:
            evidence.ran_dense[layer] = NOT_PICKED
        elif myelin:
            evidence.unknown[layer] = (f"{node} is not named in the lists; it may be inside a Myelin region "
                                       f"({myelin[0][:80]}), where per-layer use cannot be told")
        elif eligible is not None:
            evidence.ran_dense[layer] = NOT_ELIGIBLE
        elif known is not None and inspector and node not in known:
            evidence.unknown[layer] = f"{node} is named by no layer of the engine inspector"
        else:
            evidence.ran_dense[layer] = "not in TensorRT's picked list: it ran dense kernels"
    named = set(evidence.ran_sparse) | {k for k, v in evidence.ran_dense.items() if v == NOT_PICKED}
    if pruned and (picked or eligible) and not named and not myelin:
        raise MpdeployError("none of TensorRT's layer names matches an ONNX node of a pruned layer (renamed by "
                            "the builder?); densify cannot tell which layers ran dense: check the build log")
    return evidence


def torch_evidence(converted: list[str], not_converted: list[dict[str, Any]], pruned: list[str]) -> Evidence:
    """Which `pruned` layers the torch engine (or its conversion plan) ran sparse."""
    reasons = {e["layer"]: e.get("reason") for e in not_converted if isinstance(e, dict) and "layer" in e}
    done = set(converted)
    evidence = Evidence("torch converted list")
    for layer in pruned:
        if layer in done:
            evidence.ran_sparse.append(layer)
        else:
            evidence.ran_dense[layer] = f"torch did not convert it: {reasons.get(layer) or 'not in the converted list'}"
    return evidence


def add_slow_layers(evidence: Evidence, slow: list[str], where: str) -> Evidence:
    """Move the layers whose sparse kernel timed slower than dense from ran_sparse to ran_dense."""
    sparse = set(evidence.ran_sparse)
    unknown = [name for name in slow if name not in sparse and name not in evidence.ran_dense]
    if unknown:
        raise MpdeployError(f"{where}: {', '.join(unknown[:3])} {'is' if len(unknown) == 1 else 'are'} not a pruned "
                            "layer this engine ran sparse; list PyTorch layer names from the pruned manifest")
    for name in slow:
        if name in sparse:
            evidence.ran_sparse.remove(name)
            evidence.ran_dense[name] = f"{SLOW} ({where})"
    return evidence


def read_slow_layers(path: Path) -> list[str]:
    """Layer names from a file: a JSON list of names, a JSON object with a "slow_layers" (or "layers")
    list of names or {"layer": name} records, or plain text with one name per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MpdeployError(f"cannot read --slow-layers {path} ({exc.strerror}); pass a readable file") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if isinstance(data, dict):
        data = data.get("slow_layers", data.get("layers"))
    if not isinstance(data, list):
        raise MpdeployError(f"--slow-layers {path}: expected a list of layer names (JSON or one per line)")
    names = [d.get("layer") if isinstance(d, dict) else d for d in data]
    if not all(isinstance(n, str) and n for n in names):
        raise MpdeployError(f"--slow-layers {path}: every entry must be a layer name (or {{\"layer\": name}})")
    return names


def compare_sparse_use(expected: list[str], after: Evidence) -> dict[str, Any]:
    """Did the rebuilt engine run sparse exactly the layers the first one did (minus those given back)?

    `expected`: the first engine's sparse layers that stayed pruned; `after`: the rebuilt engine's evidence."""
    want, now = set(expected), set(after.ran_sparse)
    check = {"source": after.source, "no_longer_sparse": sorted(want - now), "newly_sparse": sorted(now - want),
             "unknown": dict(after.unknown)}
    check["unchanged"] = not check["no_longer_sparse"] and not check["newly_sparse"]
    return check

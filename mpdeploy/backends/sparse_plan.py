"""Which layers a backend can run sparse, decided on the dense model before pruning (`prune --backend B`).

A layer pruned to 2:4 that the engine runs dense costs accuracy and buys nothing, so pruning for a
backend keeps those layers dense:

    trt    TensorRT's placement rules (`check_trt_sparsity`, what `polygraphy inspect sparsity` checks)
           on a legacy ONNX export of the dense model, each weight mapped back to its layer by value
    torch  the torch backend's conversion plan for the kernel / precision / conv1x1 option, without
           the 2:4 check (the dense model is not pruned yet): shape rules, Linear and large 1x1 convs
    ort    ONNX Runtime on CPU has no sparse kernels: it prunes for TensorRT's rules, as the target
           of a later GPU build (one line says so)

TensorRT also times sparse against dense kernels and may keep dense for an eligible layer: that is
only known after a build, which `mpdeploy densify` reads. Needs no GPU.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

TARGETS = ("trt", "torch", "ort")
ORT_CPU_LINE = ("ort: ONNX Runtime on CPU has no sparse kernels, so no layer runs sparse there; pruning for "
                "TensorRT's rules instead, as the target of a later GPU build")
# The export the TensorRT rules are checked on: the project's default exporter and opset.
_EXPORT = SimpleNamespace(exporter="legacy", opset=18, dynamic_batch=True, check_batch=2)


@dataclass(frozen=True)
class SparsePlan:
    """What a backend will run sparse: `runs_dense` maps each candidate layer it will not to why."""

    backend: str  # the backend asked for
    rules: str  # whose rules decided (trt for ort)
    settings: dict[str, Any]
    runs_dense: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    def record(self) -> dict[str, Any]:
        """The prune manifest's `pruned_for` entry."""
        return {"backend": self.backend, "rules": self.rules, "settings": self.settings,
                "runs_dense": dict(self.runs_dense), "note": self.note}


def check_target(backend: str | None) -> None:
    if backend is not None and backend not in TARGETS:
        raise MpdeployError(f"cannot prune for backend {backend!r}; choose one of {', '.join(TARGETS)}")


def sparse_plan(model, input_shape, names: list[str], backend: str, precision: str | None = None,
                options: dict[str, Any] | None = None) -> SparsePlan:
    """The plan of `backend` for the candidate layers `names` of the dense `model` (not modified)."""
    check_target(backend)
    options = dict(options or {})
    if backend == "torch":
        return _torch_plan(model, names, precision, options)
    plan = _trt_plan(model, input_shape, names)
    if backend == "ort":
        logger.info(ORT_CPU_LINE)
        return SparsePlan("ort", plan.rules, plan.settings, plan.runs_dense,
                          ORT_CPU_LINE if not plan.note else f"{ORT_CPU_LINE}; {plan.note}")
    return plan


def _torch_plan(model, names: list[str], precision: str | None, options: dict[str, Any]) -> SparsePlan:
    from mpdeploy.backends.torch_sparse import TorchSparseBackend, plan_conversion

    defaults = {k: v[0] for k, v in TorchSparseBackend.options.items()}
    settings = {"precision": precision or TorchSparseBackend.default_precision,
                "kernel": options.get("kernel") or defaults["kernel"],
                "conv1x1": options.get("conv1x1") or defaults["conv1x1"]}
    plan = plan_conversion(model, settings["kernel"], settings["precision"], settings["conv1x1"],
                           check_pattern=False)
    wanted = set(names)
    runs_dense = {e["name"]: f"torch runs it dense: {e['reason']}" for e in plan
                  if e["name"] in wanted and not e["convert"]}
    return SparsePlan("torch", "torch conversion plan (kernel, precision, shape rules; Linear and 1x1 convs)",
                      settings, runs_dense)


def _trt_plan(model, input_shape, names: list[str]) -> SparsePlan:
    """TensorRT's rules on the exported ONNX; where the export or the mapping fails, the N:M geometry
    rules prune already applied stand (said in the plan's note, never silently)."""
    rules = "TensorRT placement rules on the ONNX (Conv axis 1, MatMul/Gemm B along K; through Q/DQ, Cast, Transpose)"
    settings = {"exporter": _EXPORT.exporter, "opset": _EXPORT.opset}
    try:
        checked = _check_exported(model, input_shape, names)
    except MpdeployError as exc:
        note = f"TensorRT's ONNX rules not checked ({exc}); the N:M geometry rules decided alone"
        logger.warning(note)
        return SparsePlan("trt", rules, settings, {}, note)
    runs_dense = {}
    for name in names:
        check = checked.get(name)
        if check is None:
            runs_dense[name] = ("TensorRT runs it dense: not reached from a Conv / MatMul / Gemm weight input in "
                                "the ONNX")
        elif not check["eligible"]:
            runs_dense[name] = f"TensorRT runs it dense: {check['reason']}"
    return SparsePlan("trt", rules, settings, runs_dense)


def _check_exported(model, input_shape, names: list[str]) -> dict[str, dict[str, Any]]:
    """{layer: TensorRT's check of its weight} on a legacy ONNX export of `model` (CPU, float32)."""
    import onnx

    from mpdeploy.onnx.initializers import map_initializers
    from mpdeploy.onnx.trt_rules import check_trt_sparsity
    from mpdeploy.onnx.from_torch import bypass_weight_identities, torch_export

    with tempfile.TemporaryDirectory(prefix="mpdeploy-plan-") as tmp:
        path = Path(tmp) / "plan.onnx"
        try:
            torch_export(model, tuple(input_shape), _EXPORT, path, "plan")
        except MpdeployError:
            raise
        except Exception as exc:  # noqa: BLE001 - an exporter failure here is reported, the export stage decides
            raise MpdeployError(f"the ONNX export failed: {type(exc).__name__}: {exc}") from None
        proto = onnx.load(str(path))
    bypass_weight_identities(proto)
    params = {f"{n}.weight": model.get_submodule(n).weight.detach().float().cpu().numpy() for n in names}
    mapped = map_initializers(proto, params, {f"{n}.weight": n for n in names})
    trt = check_trt_sparsity(proto)
    return {n: trt.get(mapped[f"{n}.weight"].initializer) for n in names if trt.get(mapped[f"{n}.weight"].initializer)}

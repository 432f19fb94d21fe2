"""Which layers a backend can run sparse, decided on the dense model before pruning (`prune --backend B`).

A layer pruned to 2:4 that the engine runs dense costs accuracy and buys nothing, so pruning for a
backend keeps those layers dense. Each backend's `prune_plan` decides (backends.base.Backend); the
TensorRT placement rules it may use live here, shared:

    TensorRT's rules  `check_trt_sparsity` (what `polygraphy inspect sparsity` checks) on a legacy ONNX
                      export of the dense model, each weight mapped back to its layer by value (the trt
                      backend; ONNX Runtime, without sparse kernels on CPU, prunes for them as the target
                      of a later GPU build)
    a conversion plan the torch backend's, for its kernel / precision / conv1x1 option, without the 2:4
                      check (the dense model is not pruned yet): shape rules, Linear and large 1x1 convs

TensorRT also times sparse against dense kernels and may keep dense for an eligible layer: that is
only known after a build, which `mpdeploy densify` reads. Needs no GPU.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mpdeploy.backends.base import SparsePlan, backend_class
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.names import BACKENDS

logger = logging.getLogger(__name__)

# The export the TensorRT rules are checked on: the project's default exporter and opset.
_EXPORT = SimpleNamespace(exporter="legacy", opset=18, dynamic_batch=True, check_batch=2)


def check_target(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise MpdeployError(f"cannot prune for backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def sparse_plan(model, input_shape, names: list[str], backend: str, precision: str | None = None,
                options: dict[str, Any] | None = None) -> SparsePlan:
    """The plan of `backend` for the candidate layers `names` of the dense `model` (not modified)."""
    check_target(backend)
    return backend_class(backend).prune_plan(model, input_shape, names, precision, dict(options or {}))


def tensorrt_rules_plan(backend: str, model, input_shape, names: list[str]) -> SparsePlan:
    """TensorRT's rules on the exported ONNX; where the export or the mapping fails, the N:M geometry
    rules prune already applied stand (said in the plan's note, never silently)."""
    rules = "TensorRT placement rules on the ONNX (Conv axis 1, MatMul/Gemm B along K; through Q/DQ, Cast, Transpose)"
    settings = {"exporter": _EXPORT.exporter, "opset": _EXPORT.opset}
    try:
        checked = _check_exported(model, input_shape, names)
    except MpdeployError as exc:
        note = f"TensorRT's ONNX rules not checked ({exc}); the N:M geometry rules decided alone"
        logger.warning(note)
        return SparsePlan(backend, rules, settings, {}, note)
    runs_dense = {}
    for name in names:
        check = checked.get(name)
        if check is None:
            runs_dense[name] = ("TensorRT runs it dense: not reached from a Conv / MatMul / Gemm weight input in "
                                "the ONNX")
        elif not check["eligible"]:
            runs_dense[name] = f"TensorRT runs it dense: {check['reason']}"
    return SparsePlan(backend, rules, settings, runs_dense)


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

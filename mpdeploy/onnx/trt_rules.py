"""TensorRT's 2:4 placement rules on an ONNX graph (what `polygraphy inspect sparsity` implements).

Where TensorRT looks for 2:4 zeros: Conv weight along axis 1 (input channels); MatMul constant input B
along axis 0 (K); Gemm B along axis 0, or axis 1 with transB=1. The pruned axis must be a multiple of 4
and the weight FP32/FP16/BF16. The check looks through Q/DQ, Cast and Transpose only. Pure ONNX graph
analysis: the export stage, the backends and the build report all use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpdeploy.sparsity.patterns import NM

# What TensorRT's sparsity check (and Polygraphy's) looks through between a weight and its consumer.
SEE_THROUGH_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "Cast",
})
# Ops that only move data: the weight behind them is found (to say why it is not eligible) but is
# not eligible, because TensorRT's check stops there.
DATA_MOVEMENT_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Expand",
    "Tile", "Split",
})




def _float_dtypes() -> dict[int, str]:
    import onnx

    return {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16"}


def _dtype_name(data_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def tensor_array(tensor) -> np.ndarray:
    """Initializer as a numpy array; BF16 comes back as its raw uint16 bits (zeros: bits & 0x7fff == 0)."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        if tensor.raw_data:
            bits = np.frombuffer(tensor.raw_data, dtype=np.uint16)
        else:
            bits = np.asarray(tensor.int32_data, dtype=np.uint32).astype(np.uint16)
        return (bits & 0x7FFF).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def nm_compliant_along(array: np.ndarray, axis: int, pattern: NM) -> bool:
    """At most `n` nonzeros in every `m` consecutive entries along `axis` (all other indices fixed)."""
    arr = np.asarray(array)
    if axis >= arr.ndim or arr.shape[axis] % pattern.m:
        return False
    moved = np.moveaxis(arr != 0, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // pattern.m, pattern.m).sum(-1)
    return bool((groups <= pattern.n).all())


def node_attribute(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _trace_weight(name: str, axis: int, inits: dict, producers: dict) -> tuple[str | None, int, list[str], str | None]:
    """Walk from a consumer input back to an initializer.

    Returns (initializer or None, the axis in the initializer, ops passed, the first op TensorRT's
    check does not look through or None). The axis is followed through Transpose; past a blocking op
    it is meaningless and only the initializer is reported.
    """
    path: list[str] = []
    blocked: str | None = None
    seen = set()
    while name not in inits:
        node = producers.get(name)
        if node is None or name in seen or not node.input:
            return None, axis, path, blocked
        seen.add(name)
        op = node.op_type
        path.append(op)
        if blocked is None and op in SEE_THROUGH_OPS:
            name = node.input[0]
        elif blocked is None and op == "Transpose":
            perm = node_attribute(node, "perm")
            # Output axis i is input axis perm[i]; no perm means reversed axes.
            axis = list(perm)[axis] if perm is not None else -1 - axis
            name = node.input[0]
        elif op in DATA_MOVEMENT_OPS or op in SEE_THROUGH_OPS or op == "Transpose":
            blocked = blocked or op
            name = node.input[0]
        else:
            # Arithmetic (Mul, Add, LayerNormalization, ...): report a weight fed straight into it.
            direct = [i for i in node.input if i in inits and len(inits[i].dims) >= 2]
            if len(direct) == 1:
                return direct[0], axis, path, blocked or op
            return None, axis, path, blocked or op
    return name, axis, path, blocked


def _weight_inputs(node) -> list[tuple[int, int, str]]:
    """(input index, required axis, role) of each input of a consumer TensorRT could run sparse."""
    if node.op_type == "Conv" and len(node.input) > 1:
        return [(1, 1, "weight")]
    if node.op_type == "MatMul":
        return [(1, 0, "B"), (0, 1, "A")]
    if node.op_type == "Gemm":
        trans_a, trans_b = int(node_attribute(node, "transA", 0)), int(node_attribute(node, "transB", 0))
        return [(1, 1 if trans_b else 0, "B"), (0, 0 if trans_a else 1, "A")]
    return []


def check_trt_sparsity(model) -> dict[str, dict[str, Any]]:
    """TensorRT's 2:4 placement rules on every weight reaching a Conv / MatMul / Gemm.

    Returns {initializer: {"consumer_op", "consumer", "input", "axis", "path", "dtype", "shape",
    "eligible", "is_2_4", "reason"}}. `eligible`: TensorRT would consider the weight for sparse math
    (right input, reached only through Q/DQ, Cast, Transpose; FP32/FP16/BF16; the pruned axis a
    multiple of 4). `is_2_4`: every 4 consecutive entries along that axis hold at least two zeros.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    dtypes = _float_dtypes()
    report: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        for index, required_axis, role in _weight_inputs(node):
            if index >= len(node.input) or not node.input[index]:
                continue
            init, axis, path, blocked = _trace_weight(node.input[index], required_axis, inits, producers)
            if init is None or (role == "A" and blocked is not None):
                continue
            tensor = inits[init]
            dims = list(tensor.dims)
            entry = {
                "consumer_op": node.op_type, "consumer": node.name, "input": index, "axis": axis,
                "path": path, "dtype": dtypes.get(tensor.data_type) or _dtype_name(tensor.data_type), "shape": dims,
                "eligible": False, "is_2_4": False, "reason": None,
            }
            if role == "A":
                entry["reason"] = (f"constant {node.op_type} input A: TensorRT's sparse path takes the constant "
                                   "weight input B only")
            elif blocked is not None:
                entry["axis"] = None
                entry["reason"] = (f"reaches {node.op_type} through {blocked} (path {' <- '.join(path)}): "
                                   f"TensorRT's sparsity check does not look through {blocked}")
            elif not 0 <= axis < len(dims):
                entry["reason"] = f"axis {axis} does not exist in a {len(dims)}-D weight {dims}"
            elif tensor.data_type not in dtypes:
                entry["reason"] = f"data type {entry['dtype']}: only FP32/FP16/BF16 weights are checked"
            elif dims[axis] % 4:
                entry["reason"] = f"axis {axis} has length {dims[axis]}, not a multiple of 4"
            else:
                entry["eligible"] = True
            if entry["axis"] is not None and 0 <= entry["axis"] < len(dims) and tensor.data_type in dtypes:
                entry["is_2_4"] = nm_compliant_along(tensor_array(tensor), entry["axis"], NM(2, 4))
            if entry["eligible"] and not entry["is_2_4"]:
                entry["reason"] = f"eligible, but not 2:4 along axis {axis}"
            # A weight seen by several consumers: the clean weight-input path is what TensorRT (and
            # Polygraphy) judge; two clean paths wanting different axes cannot both be 2:4.
            entry["_rank"] = 0 if blocked is not None else (1 if role == "A" else 2)
            previous = report.get(init)
            if previous is None or entry["_rank"] > previous["_rank"]:
                report[init] = entry
            elif entry["_rank"] == previous["_rank"] == 2 and previous["axis"] != entry["axis"]:
                previous.update(eligible=False, reason=f"used by several consumers along different axes "
                                                       f"({previous['axis']} and {entry['axis']})")
    for entry in report.values():
        del entry["_rank"]
    return report

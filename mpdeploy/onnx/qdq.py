"""INT8 / strongly typed pitfalls visible in an ONNX graph itself (pure graph analysis, no TensorRT).

What `qdq_graph_findings` names, for the build report (and the export's sparsity.json):
- quantized weights without a quantized output: a Conv/MatMul/Gemm whose weight comes through
  DequantizeLinear but whose output never reaches a QuantizeLinear (through its epilogue: bias, residual
  Add, activation). Sparse INT8 kernels need INT8 in and out (NVIDIA/Model-Optimizer#1664); without an
  INT8 epilogue TensorRT may mark weights sparse yet run dense kernels (NVIDIA/TensorRT#4694);
- Q/DQ where TensorRT cannot fuse it: a weight DQ on a non-constant input, Reshape/Transpose between the
  weight DQ and its op, Q/DQ between a Conv and the BatchNormalization that should fold into it;
- FP32 islands: compute ops left in FP32 in a graph that otherwise computes in FP16/BF16/INT8; a strongly
  typed network runs them in FP32 exactly as written.
"""

from __future__ import annotations

from typing import Any

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")
# Ops TensorRT fuses into a Conv/GEMM epilogue before the output QuantizeLinear (bias, residual, activation).
EPILOGUE_OPS = frozenset({"Add", "Relu", "Clip", "Sigmoid", "Mul", "LeakyRelu", "BatchNormalization", "Gelu",
                          "HardSigmoid", "HardSwish", "Tanh"})
FLOAT_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 11: "FP64"}
# Ops that compute (so an FP32 one is an FP32 island); data movement and Q/DQ do not count.
_NOT_COMPUTE = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze",
                          "Unsqueeze", "Shape", "Gather", "Concat", "Slice", "Identity", "Constant", "Expand", "Split"})


def _graph_maps(model) -> tuple[dict, dict, dict]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return inits, producers, consumers


def _quantized_output(node, consumers: dict) -> bool:
    """The weighted op's output reaches a QuantizeLinear through single-consumer epilogue ops only."""
    name = node.output[0]
    for _ in range(6):
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            return True
        if any(u.op_type == "QuantizeLinear" for u in users):
            return True
        if len(users) != 1 or users[0].op_type not in EPILOGUE_OPS:
            return False
        name = users[0].output[0]
    return False


def _weight_dq(node, producers: dict, inits: dict) -> tuple[str | None, str | None]:
    """('dq', None) weight through DQ as TensorRT fuses it; ('dq', problem) if the DQ is misplaced; (None, None) no DQ."""
    if len(node.input) < 2:
        return None, None
    producer = producers.get(node.input[1])  # the weight: Conv W, MatMul / Gemm B
    path = []
    while producer is not None and producer.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
        path.append(producer.op_type)
        producer = producers.get(producer.input[0])
    if producer is None or producer.op_type != "DequantizeLinear":
        return None, None
    src = producer.input[0]
    before = producers.get(src)
    constant = src in inits or (before is not None and before.op_type == "QuantizeLinear" and before.input[0] in inits)
    if not constant:
        if node.op_type == "MatMul":
            return None, None  # activation x activation (attention): both inputs quantized, no weight
        return "dq", "its weight DequantizeLinear does not take a constant (initializer or Q of one)"
    if path:
        return "dq", (f"{' <- '.join(path)} sits between the weight's DequantizeLinear and the {node.op_type}: "
                      "TensorRT fuses constant -> DQ -> op only")
    return "dq", None


def qdq_graph_findings(model) -> dict[str, Any]:
    """INT8 Q/DQ and strongly typed pitfalls in an ONNX graph (pure graph analysis).

    Returns {"quantized_weights", "unquantized_outputs", "unfusable_qdq", "fp32_islands", "warnings"}:
    weighted ops whose weight arrives through DQ but whose output never reaches a QuantizeLinear (no INT8
    epilogue: sparse INT8 kernels want INT8 in and out, NVIDIA/Model-Optimizer#1664); Q/DQ where TensorRT
    cannot fuse it (DQ on a non-constant weight, DQ -> Reshape/Transpose -> op, Q/DQ between a Conv and
    the BatchNormalization that should fold into it); compute ops left in FP32 in a graph that is
    otherwise FP16/BF16/INT8 (a strongly typed network runs them in FP32, as written).
    """
    inits, producers, consumers = _graph_maps(model)
    quantized, no_epilogue, unfusable = [], [], []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        kind, problem = _weight_dq(node, producers, inits)
        if kind is None:
            continue
        quantized.append(node.name)
        if problem:
            unfusable.append({"node": node.name, "reason": problem})
        if not _quantized_output(node, consumers):
            no_epilogue.append(node.name)
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        dq = producers.get(node.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        conv = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if conv is not None and conv.op_type == "Conv":
            unfusable.append({"node": node.name, "reason": f"Q/DQ between {conv.name} and its BatchNormalization: "
                                                            "TensorRT cannot fold the BatchNorm into the quantized Conv"})
    islands = _fp32_islands(model, producers, inits)
    warnings = []
    if no_epilogue:
        warnings.append(f"INT8: {len(no_epilogue)} of {len(quantized)} quantized Conv/MatMul/Gemm have no quantized "
                        f"output (e.g. {', '.join(no_epilogue[:3])}): without an INT8 epilogue TensorRT may mark the "
                        "weights sparse yet run dense kernels (NVIDIA/Model-Optimizer#1664)")
    if unfusable:
        warnings.append(f"INT8: {len(unfusable)} Q/DQ placements TensorRT cannot fuse, e.g. {unfusable[0]['node']}: "
                        f"{unfusable[0]['reason']}")
    if islands["compute_ops"] and islands["low_precision_ops"]:
        warnings.append(f"strongly typed: {len(islands['compute_ops'])} compute ops stay FP32 in a "
                        f"{'/'.join(islands['low_precision'])} network (e.g. {', '.join(islands['compute_ops'][:3])}): "
                        "TensorRT runs them in FP32 exactly as written (no precision flags to lower them)")
    return {"quantized_weights": quantized, "unquantized_outputs": no_epilogue, "unfusable_qdq": unfusable,
            "fp32_islands": islands["compute_ops"], "warnings": warnings}


def _tensor_types(model) -> dict[str, int]:
    """Element type of every tensor: declared where the graph says, else carried forward from the first
    typed float input (Cast sets its own; DequantizeLinear gives FP32)."""
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types[node.output[0]] = to
            continue
        if node.op_type == "DequantizeLinear":
            types.setdefault(node.output[0], 1)
            continue
        carried = next((types[i] for i in node.input if types.get(i) in FLOAT_NAMES), None)
        for out in node.output:
            if out not in types and carried is not None:
                types[out] = carried
    return types


def _fp32_islands(model, producers: dict, inits: dict) -> dict[str, Any]:
    """Compute ops whose float inputs are FP32, in a graph that also computes in FP16/BF16 or through Q/DQ."""
    types = _tensor_types(model)
    fp32_ops, low = [], set()
    quantized_inputs = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            quantized_inputs.add(node.output[0])
    for node in model.graph.node:
        if node.op_type in _NOT_COMPUTE:
            continue
        float_inputs = [types.get(i) for i in node.input if i and types.get(i) in FLOAT_NAMES]
        if any(t in (10, 16) for t in float_inputs):
            low.add(FLOAT_NAMES[next(t for t in float_inputs if t in (10, 16))])
            continue
        if any(i in quantized_inputs for i in node.input):
            low.add("INT8")
            continue
        if float_inputs and all(t == 1 for t in float_inputs):
            fp32_ops.append(node.name or node.op_type)
    return {"compute_ops": fp32_ops if low else [], "low_precision_ops": bool(low), "low_precision": sorted(low)}

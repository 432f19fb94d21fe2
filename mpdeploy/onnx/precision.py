"""FP32 ONNX -> the FP16, BF16 or INT8 (Q/DQ) ONNX a strongly typed TensorRT network is built from.

TensorRT 11 removed the builder's precision flags: the precision is whatever the ONNX says. So:

- `fp16`: ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`, shipped inside the
  onnxruntime wheel the project already depends on, so no new dependency) with `keep_io_types`:
  weights, activations and math in FP16, graph input/output FP32 behind Casts. Zeros stay zeros;
  values below FP16's smallest subnormal are clamped to it, never to zero, and never the other way.
- `bf16`: the same conversion with every FP16 type then rewritten to BF16 and every weight rounded from
  its FP32 original (round to nearest even). No maintained converter on the package index writes BF16
  ONNX except ModelOpt's AutoCast, which drags in a second stack; the FP16 converter's graph decisions
  (which ops stay FP32, where Casts go) carry over unchanged because BF16 has FP32's exponent range.
- `int8`: ONNX Runtime's `quantize_static` in QDQ format: symmetric per-channel INT8 weights kept as
  FP32 initializers behind QuantizeLinear -> DequantizeLinear (`AddQDQPairToWeight`; TensorRT
  constant-folds the Q and fuses weight -> DQ -> Conv/MatMul/Gemm, and its sparsity check, like
  Polygraphy's, looks through Q/DQ at the FP32 zeros), symmetric INT8 activations calibrated (MinMax) on
  the calibration images, biases left in float (TensorRT does not take an INT32 bias through DQ), and
  Q/DQ on the outputs of quantized ops so a Conv/GEMM can end in an INT8 epilogue (what sparse INT8
  kernels need: NVIDIA/Model-Optimizer#1664). Zero-point 0 keeps every zero at zero, so 2:4 survives.
  Chosen over ModelOpt's ONNX quantizer because it is already installed with onnxruntime, runs on
  CPU, and the same file is what the ort backend then runs and audits here.

Nothing here imports a stage module: the backends use `require_precision_file` too (the file names are
the onnx kind's, `OnnxFolder.model_name`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder

logger = logging.getLogger(__name__)

# Ops whose (constant) weight input is quantized per channel, and the channel axis for each:
# Conv weights [O, I, kh, kw] along O; MatMul B [K, N] along N; Gemm B per output channel.
PER_CHANNEL_AXIS = {"Conv": 0, "MatMul": 1, "Gemm": 0}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def require_precision_file(onnx_dir: Path, variant: str, precision: str) -> Path:
    """The precision's ONNX in an export artifact, or a one-line error saying how to make it."""
    path = Path(onnx_dir) / OnnxFolder.model_name(variant, precision)
    if not path.is_file():
        raise MpdeployError(f"{path} not found: the export has no {precision} {variant} model; re-run "
                            f"`mpdeploy export --precision {precision}` (mpdeploy build does this itself)")
    return path


# ---------------------------------------------------------------------------------------------------
# FP16 / BF16


def to_fp16(model_proto):
    """FP32 ModelProto -> FP16 ModelProto (I/O stay FP32) with ONNX Runtime's converter."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(model_proto, keep_io_types=True, force_fp16_initializers=True)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends the input Casts after their consumers
    return wrapped.model


def _bf16_tensor(array: np.ndarray, name: str):
    """An ONNX BFLOAT16 TensorProto from float values (round to nearest even; weights are finite)."""
    import onnx

    f32 = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype(np.uint16)  # +-0 stay +-0
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.BFLOAT16, dims=list(bits.shape))
    tensor.raw_data = bits.tobytes()
    return tensor


def _retype_tensor(tensor, originals: dict[str, np.ndarray]):
    from onnx import numpy_helper

    value = originals.get(tensor.name)
    if value is None:
        value = numpy_helper.to_array(tensor).astype(np.float32)
    return _bf16_tensor(value, tensor.name)


def fp16_to_bf16(fp16_proto, fp32_proto):
    """Rewrite every FP16 type of a converted model to BF16, weights rounded from their FP32 originals."""
    import onnx
    from onnx import numpy_helper

    f16, b16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    originals = {t.name: numpy_helper.to_array(t) for t in fp32_proto.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT}
    model = onnx.ModelProto()
    model.CopyFrom(fp16_proto)
    graph = model.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == f16:
            graph.initializer[i].CopyFrom(_retype_tensor(tensor, originals))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == f16:
                attr.i = b16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f16:
                attr.t.CopyFrom(_bf16_tensor(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == f16:
            value.type.tensor_type.elem_type = b16
    return model


BF16_OPSET = 22  # Conv, pooling and others accept bfloat16 only from opset 22 on


def to_bf16(model_proto):
    """BF16 model; the default domain is raised to opset 22 first (onnx's version converter)."""
    import onnx
    from onnx import version_converter

    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), BF16_OPSET)
    if opset < BF16_OPSET:
        model_proto = version_converter.convert_version(model_proto, BF16_OPSET)
    converted = fp16_to_bf16(to_fp16(model_proto), model_proto)
    onnx.checker.check_model(converted, full_check=True)  # types against the opset's schemas
    return converted


# ---------------------------------------------------------------------------------------------------
# INT8 (Q/DQ)


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over numpy batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._items = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_int8(fp32_path: Path, out_path: Path, input_name: str, batches: list[np.ndarray]) -> dict[str, Any]:
    """Write the INT8 Q/DQ model of `fp32_path` to `out_path`; returns what was done (for the record)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    if not batches:
        raise MpdeployError("INT8 export needs calibration images; pass --calib DIR|digits (synthetic for smoke runs)")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Batches, CalibrationDataReader), {})(input_name, batches)
    # ORT's documented pre-processing: shape inference plus basic graph optimization, which folds
    # BatchNormalization into the Conv weights (a per-output-channel scale: zeros stay zeros). Without it
    # a Q/DQ pair would sit between Conv and BatchNormalization, where TensorRT cannot fuse them.
    prepared = Path(out_path).with_name(Path(out_path).name + ".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    extra = {
        "ActivationSymmetric": True,  # TensorRT's INT8 is symmetric: zero-point must be 0
        "WeightSymmetric": True,
        "AddQDQPairToWeight": True,  # FP32 weight -> Q -> DQ: TensorRT folds it; the sparsity checks see FP32 zeros
        "QuantizeBias": False,  # TensorRT takes the float bias and fuses it into the kernel
        "DedicatedQDQPair": False,
        "QDQOpTypePerChannelSupportToAxis": dict(PER_CHANNEL_AXIS),
    }
    try:
            quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                        extra_options=extra)
    finally:
        prepared.unlink(missing_ok=True)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "weights": "int8 symmetric per channel, FP32 initializer -> QuantizeLinear -> DequantizeLinear",
            "activations": "int8 symmetric, MinMax calibration", "bias": "float (not quantized)",
            "calibration_batches": len(batches), "calibration_images": int(sum(len(b) for b in batches)),
            "op_types": list(QUANTIZED_OPS)}


def weight_quantization(model_proto) -> dict[str, dict[str, Any]]:
    """Per initializer reaching a QuantizeLinear: its scale shape, axis and zero-point (zero means symmetric)."""
    from onnx import numpy_helper

    from mpdeploy.onnx.trt_rules import node_attribute

    inits = {t.name: t for t in model_proto.graph.initializer}
    out = {}
    for node in model_proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        out[node.input[0]] = {
            "channels": int(scale.size) if scale is not None else None,
            "axis": node_attribute(node, "axis", 1),
            "zero_point_dtype": str(zp.dtype) if zp is not None else None,
            "symmetric": bool(zp is None or not np.any(zp)),
        }
    return out


def quantized_weight(model_proto, name: str) -> np.ndarray:
    """The INT8 values TensorRT will fold out of `name` -> QuantizeLinear (round half to even, saturate)."""
    from onnx import numpy_helper

    from mpdeploy.onnx.trt_rules import node_attribute

    inits = {t.name: t for t in model_proto.graph.initializer}
    node = next(n for n in model_proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
    w = numpy_helper.to_array(inits[name]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    if scale.size > 1:
        shape = [1] * w.ndim
        shape[node_attribute(node, "axis", 1) % w.ndim] = scale.size
        scale = scale.reshape(shape)
    return np.clip(np.rint(w / scale), -128, 127).astype(np.int8)


# ---------------------------------------------------------------------------------------------------
# what a converted file holds


def dtype_census(model_proto) -> dict[str, int]:
    """How many initializer elements of each data type (FLOAT, FLOAT16, BFLOAT16, INT8, ...) the model holds."""
    import onnx

    out: dict[str, int] = {}
    for t in model_proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + int(np.prod(t.dims)) if t.dims else out.get(name, 0) + 1
    return out


def convert(fp32_path: Path, out_path: Path, precision: str, input_name: str,
            calib_batches: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Write `precision`'s ONNX of the FP32 file `fp32_path` to `out_path`; returns the conversion record."""
    import onnx

    if precision == "int8":
        record = quantize_int8(fp32_path, out_path, input_name, calib_batches or [])
    elif precision in ("fp16", "bf16"):
        proto = onnx.load(str(fp32_path))
        converted = to_fp16(proto) if precision == "fp16" else to_bf16(proto)
        onnx.save_model(converted, str(out_path))
        record = {"tool": "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types)"
                  + ("; FP16 types then rewritten to BF16, weights rounded from FP32" if precision == "bf16" else "")}
    else:
        raise MpdeployError(f"no conversion for precision {precision!r}; choose fp16, bf16 or int8")
    onnx.checker.check_model(str(out_path))
    record["initializer_elements_by_dtype"] = dtype_census(onnx.load(str(out_path)))
    return record

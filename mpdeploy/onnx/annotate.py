"""Rewrites of an exported ONNX that keep its graph: N:M annotations in metadata_props, and the legacy
FP16-weights-behind-Cast form (`export --fp16`)."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

METADATA_KEY = "mpdeploy.sparsity"


def weights_to_fp16(model_proto) -> list[str]:
    """Store every FP32 initializer of 2+ dims as FP16 behind a Cast to FP32 (same name, so annotations
    and the name map hold). Graph I/O and compute stay FP32; TensorRT and Polygraphy look through Cast."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    converted, casts = [], []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        arr = numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
        converted.append(tensor.name)
    if not converted:
        return []
    names = set(converted)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = f"{name}__fp32"
    for name in converted:
        casts.append(helper.make_node("Cast", [name], [f"{name}__fp32"], name=f"{name}__cast_fp32",
                                      to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    for collection in (graph.value_info, graph.input):
        stale = [v for v in collection if v.name in names]
        for v in stale:
            collection.remove(v)
    return converted


def round_to_fp16(model):
    """The PyTorch function an FP16-weight ONNX computes: 2+-D float tensors rounded through FP16."""
    import torch

    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and t.dim() >= 2:
                t.copy_(t.half().float())
    return model


def per_tensor_metadata_supported() -> bool:
    import onnx

    return "metadata_props" in onnx.TensorProto().DESCRIPTOR.fields_by_name


def set_model_metadata(model_proto, key: str, value: str) -> None:
    for entry in model_proto.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    model_proto.metadata_props.add(key=key, value=value)


def annotate(model_proto, annotations: dict[str, dict[str, Any]], header: dict[str, Any]) -> bool:
    """Model-level JSON always; per-initializer metadata_props where this onnx has them."""
    set_model_metadata(model_proto, METADATA_KEY, json.dumps({**header, "tensors": annotations}, sort_keys=True))
    if not per_tensor_metadata_supported():
        return False
    by_name = {t.name: t for t in model_proto.graph.initializer}
    for name, ann in annotations.items():
        tensor = by_name[name]
        for key, value in (("mpdeploy.nm_pattern", ann["pattern"]), ("mpdeploy.nm_axis", str(ann["axis"])),
                           ("mpdeploy.param", ann["param"])):
            tensor.metadata_props.add(key=key, value=value)
    return True

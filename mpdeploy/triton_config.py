"""Triton model configs for mpdeploy engines, built with Triton's own `ModelConfig` protobuf (tritonclient).

What we write is what Triton parses: `build_model_config` fills the protobuf from an engine manifest's
io (dtypes, dims, batch dim dropped when batching), `config_to_text` / `parse_config` convert to and
from `config.pbtxt` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpdeploy.errors import MpdeployError

# numpy dtype name (engine manifest io) -> Triton DataType name
_TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # tritonclient is in the [serve] extra
        raise MpdeployError(
            "mpdeploy ship needs Triton's model-config protobuf; pip install 'tritonclient[grpc]'"
        ) from exc
    return model_config_pb2


def _tensor(pb2, spec: dict[str, Any], batched: bool, where: str):
    name, dtype, shape = spec.get("name"), spec.get("dtype"), list(spec.get("shape") or [])
    if not name or dtype not in _TRITON_DTYPES or not shape:
        raise MpdeployError(
            f"engine io {where} {spec!r} needs a name, a dtype in {', '.join(_TRITON_DTYPES)} and a shape; "
            f"rebuild the engine"
        )
    if batched:
        if shape[0] not in (-1, None):
            raise MpdeployError(
                f"{where} {name!r} has a fixed first dim {shape[0]} (shape {shape}), so Triton cannot batch it; "
                f"pass --max-batch-size 0 or rebuild with a dynamic batch dim"
            )
        shape = shape[1:]
    dims = [-1 if d in (-1, None) or not isinstance(d, int) else d for d in shape]
    t = pb2.ModelInput() if where == "input" else pb2.ModelOutput()
    t.name = name
    t.data_type = pb2.DataType.Value(_TRITON_DTYPES[dtype])
    if dims:
        t.dims.extend(dims)
    else:  # a per-sample scalar: Triton wants non-empty dims
        t.dims.append(1)
        t.reshape.SetInParent()
    return t


def build_model_config(
    name: str,
    manifest: dict[str, Any],
    *,
    serve: str,
    max_batch_size: int,
    kind: str,
    instance_count: int,
    python_env: Path | None = None,
):
    """The `ModelConfig` protobuf for an engine manifest; `serve` is a platform or "python"."""
    pb2 = _model_config_pb2()
    cfg = pb2.ModelConfig(name=name, max_batch_size=max_batch_size)
    if serve == "python":
        cfg.backend = "python"
        # The stub runs the model in this environment (it ignores PYTHONPATH); a venv directory works.
        cfg.parameters["EXECUTION_ENV_PATH"].string_value = str(python_env)
    else:
        cfg.platform = serve
    batched = max_batch_size > 0
    cfg.input.extend(_tensor(pb2, t, batched, "input") for t in manifest["io"]["inputs"])
    cfg.output.extend(_tensor(pb2, t, batched, "output") for t in manifest["io"]["outputs"])
    if batched:
        cfg.dynamic_batching.SetInParent()
    group = cfg.instance_group.add()
    group.count = instance_count
    group.kind = pb2.ModelInstanceGroup.Kind.Value(kind)
    return cfg


def config_to_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse config.pbtxt text into Triton's ModelConfig (raises google.protobuf ParseError)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _model_config_pb2().ModelConfig())



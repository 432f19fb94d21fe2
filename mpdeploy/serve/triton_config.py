"""Triton model configs for mpdeploy engines, built with Triton's own `ModelConfig` protobuf (tritonclient).

What we write is what Triton parses: `build_model_config` fills the protobuf from an engine manifest's
io (dtypes, dims, batch dim dropped when batching), `config_to_text` / `parse_config` convert to and
from `config.pbtxt` text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError

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


# The most input elements one inference request may declare is written into every config.pbtxt as this
# parameter; the HTTP front of mpdeploy's own launcher (triton_guard.py) refuses a request past it before
# Triton's parser allocates what the request declares (Triton ignores parameters it does not know).
LIMIT_PARAMETER = "mpdeploy_max_request_elements"
# Per sample, for inputs with a dynamic dim (-1): the same bound as mpdeploy's --input-shape (model_args).
MAX_DYNAMIC_SAMPLE_ELEMENTS = 1 << 26


def computed_limit(cfg) -> int:
    """Elements a request may hold: per input, its dims (a dynamic dim: MAX_DYNAMIC_SAMPLE_ELEMENTS per
    sample) times the batch (max_batch_size, 1 without batching), summed over the inputs."""
    total = 0
    for t in cfg.input:
        dims = list(t.dims)
        per_sample = MAX_DYNAMIC_SAMPLE_ELEMENTS if any(d < 0 for d in dims) else 1
        for d in dims:
            per_sample *= d if d > 0 else 1
        total += per_sample * max(1, cfg.max_batch_size)
    return total


def request_limit(cfg) -> int:
    """The limit a config states (its LIMIT_PARAMETER), else the one `computed_limit` gives."""
    if LIMIT_PARAMETER in cfg.parameters:
        text = cfg.parameters[LIMIT_PARAMETER].string_value
        if text.isdigit():
            return int(text)
    return computed_limit(cfg)


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
    cfg.parameters[LIMIT_PARAMETER].string_value = str(computed_limit(cfg))
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



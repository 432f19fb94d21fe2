"""The names the chain is spelled with, in one table: backends, precisions, engine variants, and the
folder a backend's engines live in. The CLI builds its choices from here: adding a backend is its own
module plus one BACKENDS entry."""

from __future__ import annotations

# backend -> "module:Class", in the order `--backend auto` tries them (imported only when asked for)
BACKENDS: dict[str, str] = {
    "trt": "mpdeploy.backends.trt.backend:TrtBackend",
    "torch": "mpdeploy.backends.torch_sparse:TorchSparseBackend",
    "ort": "mpdeploy.backends.ort:OrtBackend",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
VARIANTS = ("sparse", "dense")  # the sparse engine and its dense twin
ENGINE_PREFIX = "engine-"


def engine_folder_name(backend: str) -> str:
    """`engine-<backend>`: the folder beside `onnx/` that holds one backend's engines."""
    return f"{ENGINE_PREFIX}{backend}"

"""The names the chain is spelled with, in one table: backends (with the traits the rest of mpdeploy
branches on), precisions, engine variants, and the folder a backend's engines live in. The CLI builds its
choices from here: adding a backend is its own module plus one BACKENDS entry, and no other module
spells a backend's name (tests/test_architecture.py checks that)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendTraits:
    """What the rest of mpdeploy may know about a backend without importing it. Code asks these, never
    which backend it is."""

    implementation: str  # "module:Class", imported only when asked for
    sparse_kernels: bool = False  # runs 2:4 weights on sparse kernels wherever it runs
    sparse_providers: tuple[str, ...] = ()  # ... or only under these run-time providers (words of its runtime record)
    cpu_unless: tuple[str, ...] | None = None  # on the CPU unless its runtime record names one of these (None: never)
    no_sparse_note: str = ""  # why nothing runs sparse where it has no sparse kernels (a clause for messages)
    # What its build report says per layer about sparse use, for densify: "picked" (TensorRT's eligible and
    # picked-kernel lists, read against the export's sparsity record) or "converted" (the layers converted
    # to sparse modules); None: nothing per layer.
    sparse_use_report: str | None = None
    plan_from_weights: bool = False  # which layers run sparse follows from the weights alone, without a build
    precision_onnx: bool = False  # builds FP16 / BF16 / INT8 engines from the export's own precision ONNX
    batch_profile: bool = False  # its engines run no batch beyond the largest they were built for
    triton_platform: str | None = None  # what Triton serves its engine file with; None: nothing Triton can serve

    def runs_sparse(self, runtime: Mapping[str, Any] | None) -> bool:
        """Can the engines run 2:4 on sparse kernels, as recorded in `runtime` (the engine's device record)?"""
        return self.sparse_kernels or any(p in _words(runtime) for p in self.sparse_providers)

    def on_cpu(self, runtime: Mapping[str, Any] | None) -> bool:
        """Do the engines run on the CPU, as recorded in `runtime`?"""
        return self.cpu_unless is not None and not any(p in _words(runtime) for p in self.cpu_unless)


def _words(runtime: Mapping[str, Any] | None) -> str:
    return " ".join(str(v) for v in (runtime or {}).values()).lower()


# backend -> its traits, in the order `--backend auto` tries them
BACKENDS: dict[str, BackendTraits] = {
    "trt": BackendTraits(
        "mpdeploy.backends.trt.backend:TrtBackend", sparse_kernels=True, sparse_use_report="picked",
        precision_onnx=True, batch_profile=True, triton_platform="tensorrt_plan"),
    "torch": BackendTraits(
        "mpdeploy.backends.torch_sparse:TorchSparseBackend", sparse_kernels=True, sparse_use_report="converted",
        plan_from_weights=True),
    "ort": BackendTraits(
        "mpdeploy.backends.ort:OrtBackend", sparse_providers=("tensorrt",), cpu_unless=("cuda", "tensorrt"),
        no_sparse_note="ONNX Runtime on CPU has no sparse kernels", precision_onnx=True,
        triton_platform="onnxruntime_onnx"),
}
NO_TRAITS = BackendTraits("")  # an unknown backend (an engine made elsewhere): no trait holds
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
VARIANTS = ("sparse", "dense")  # the sparse engine and its dense twin
ENGINE_PREFIX = "engine-"


def traits(backend: str | None) -> BackendTraits:
    """The traits of `backend`; none for a name not in BACKENDS."""
    return BACKENDS.get(backend or "", NO_TRAITS)


def backends_with(trait: str) -> list[str]:
    """The backends where `trait` holds (is truthy), in BACKENDS order."""
    return [name for name, t in BACKENDS.items() if getattr(t, trait)]


def engine_folder_name(backend: str) -> str:
    """`engine-<backend>`: the folder beside `onnx/` that holds one backend's engines."""
    return f"{ENGINE_PREFIX}{backend}"

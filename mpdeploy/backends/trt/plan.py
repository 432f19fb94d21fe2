"""mpdeploy's build options -> Polygraphy / TensorRT arguments, as a pure function of what TensorRT offers.

TensorRT 11 removed `BuilderFlag.FP16 / INT8 / BF16` and `IBuilderConfig.int8_calibrator`; both 10 and 11
build strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, Polygraphy's
`NetworkFromOnnxPath(path, strongly_typed=True)`), whose precision is the ONNX's own: an FP16 / BF16 ONNX
or INT8 Q/DQ. So:

- typing "strong" (default): the precision's ONNX (`model.fp16.onnx`, `model.int8.onnx`, ...), strongly
  typed, no precision flags: the same call on TensorRT 10 and 11;
- typing "legacy": the FP32 ONNX, weakly typed, `CreateConfig(fp16=/bf16=/int8=, calibrator=)`: only where
  the installed TensorRT still has those flags (detected, never read off the version string).

Sparse weights (`CreateConfig(sparse_weights=True)`, BuilderFlag.SPARSE_WEIGHTS) are on for the sparse
variant either way. Nothing here imports TensorRT: `detect_capabilities` reads a module handed to it and
`plan_trt_build` takes the resulting record, so both API generations are tested on CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mpdeploy.core.errors import MpdeployError

TYPINGS = ("strong", "legacy")
FLAG_FOR = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}
SUPPORTED = "TensorRT 10 or 11 (pip install 'tensorrt>=10,<12', or the Dockerfile's image)"


@dataclass(frozen=True)
class TrtCapabilities:
    """What the installed TensorRT offers, by feature."""

    version: str
    strongly_typed: bool  # trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED exists
    sparse_weights: bool  # trt.BuilderFlag.SPARSE_WEIGHTS exists
    precision_flags: frozenset[str] = frozenset()  # which of FP16 / BF16 / INT8 trt.BuilderFlag still has
    int8_calibrator: bool = False  # trt.IBuilderConfig.int8_calibrator exists

    @property
    def major(self) -> int | None:
        match = re.match(r"(\d+)", self.version or "")
        return int(match.group(1)) if match else None


# The two API generations this module is written for (and tested against as records).
TRT10 = TrtCapabilities("10.13.3", strongly_typed=True, sparse_weights=True,
                        precision_flags=frozenset({"FP16", "BF16", "INT8"}), int8_calibrator=True)
TRT11 = TrtCapabilities("11.4.0", strongly_typed=True, sparse_weights=True)


def detect_capabilities(trt: Any) -> TrtCapabilities:
    """Read the features off an imported `tensorrt` module."""
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    flags = getattr(trt, "BuilderFlag", None)
    config_cls = getattr(trt, "IBuilderConfig", None)
    return TrtCapabilities(
        version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed=hasattr(creation, "STRONGLY_TYPED"),
        sparse_weights=hasattr(flags, "SPARSE_WEIGHTS"),
        precision_flags=frozenset(f for f in FLAG_FOR.values() if hasattr(flags, f)),
        int8_calibrator=hasattr(config_cls, "int8_calibrator"),
    )


def unsupported_reason(caps: TrtCapabilities) -> str | None:
    """Why this TensorRT cannot be used (one line), or None."""
    missing = [name for name, ok in (("NetworkDefinitionCreationFlag.STRONGLY_TYPED", caps.strongly_typed),
                                     ("BuilderFlag.SPARSE_WEIGHTS", caps.sparse_weights)) if not ok]
    if missing or (caps.major is not None and caps.major < 10):
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        return f"TensorRT {caps.version} is not supported{lacks}; mpdeploy's trt backend needs {SUPPORTED}"
    return None


@dataclass(frozen=True)
class TrtBuildPlan:
    """What to hand to Polygraphy: `NetworkFromOnnxPath(file, **network)`, `CreateConfig(**config, profiles=...)`."""

    onnx_precision: str  # which export file: fp32 -> model.onnx, fp16 -> model.fp16.onnx, ...
    typing: str  # "strong" | "legacy"
    network: dict[str, Any]
    config: dict[str, Any]
    calibrator: bool = False  # legacy INT8: an IInt8 calibrator must be attached
    notes: tuple[str, ...] = field(default_factory=tuple)


def plan_trt_build(variant: str, precision: str, typing: str, caps: TrtCapabilities) -> TrtBuildPlan:
    """Translate (variant, precision, typing) for the TensorRT described by `caps`; a user error if impossible."""
    reason = unsupported_reason(caps)
    if reason:
        raise MpdeployError(reason)
    if typing not in TYPINGS:
        raise MpdeployError(f"unknown TensorRT typing {typing!r}; choose strong or legacy")
    if precision not in ("fp32", *FLAG_FOR):
        raise MpdeployError(f"unknown precision {precision!r}; choose fp32, fp16, bf16 or int8")
    sparse = variant == "sparse"
    notes = []
    if caps.major is not None and caps.major > 11:
        notes.append(f"TensorRT {caps.version} is newer than the generations this backend was written for (10, 11)")
    if typing == "strong" or precision == "fp32":
        if precision == "fp32":
            notes.append("fp32: TensorRT runs sparse math only in FP16/BF16/INT8; SPARSE_WEIGHTS changes nothing here")
        return TrtBuildPlan(precision, "strong", {"strongly_typed": True}, {"sparse_weights": sparse},
                            notes=tuple(notes))
    flag = FLAG_FOR[precision]
    if flag not in caps.precision_flags:
        raise MpdeployError(f"TensorRT {caps.version} has no BuilderFlag.{flag} (removed in TensorRT 11); build with the "
                            f"default strongly typed path (typing=strong) from the {precision} export")
    config: dict[str, Any] = {"sparse_weights": sparse, precision: True}
    calibrator = False
    if precision == "int8":
        if not caps.int8_calibrator:
            raise MpdeployError(f"TensorRT {caps.version} has no IBuilderConfig.int8_calibrator; use typing=strong with "
                                "the Q/DQ export (--precision int8)")
        calibrator = True
        if "FP16" in caps.precision_flags:
            config["fp16"] = True  # layers without an INT8 kernel fall back to FP16, not FP32
    notes.append("legacy precision flags on a weakly typed network: deprecated in TensorRT 10, removed in 11")
    return TrtBuildPlan("fp32", "legacy", {"strongly_typed": False}, config, calibrator, tuple(notes))

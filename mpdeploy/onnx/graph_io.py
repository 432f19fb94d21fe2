"""An exported ONNX's inputs and outputs (names, dtypes, shapes): the engine manifest's `io`, and the
check that a manifest's `io` is still what its ONNX says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError


def onnx_io(onnx_path: Path) -> dict[str, Any]:
    """The engine manifest's `io` from the exported ONNX (names, float32, -1 for the dynamic batch)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}

    def spec(value) -> dict[str, Any]:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
        return {"name": value.name, "dtype": dtypes.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def check_recorded_io(manifest_path: Path, recorded: Any, onnx_path: Path) -> None:
    """Refuse an engine manifest whose `io` differs from the ONNX it was built from (the engine stage
    writes it from that file): the audit and Triton's config take shapes and names from `io`, so an
    edited one would be believed over the real engine."""
    actual = onnx_io(onnx_path)
    if recorded == actual:
        return
    for group in ("inputs", "outputs"):
        want, got = actual[group], (recorded or {}).get(group) if isinstance(recorded, dict) else None
        if got != want:
            raise MpdeployError(f"{manifest_path} records io.{group} {got!r} but the ONNX it was built from "
                                f"({onnx_path}) has {want!r}: the manifest was edited; rebuild the engine")
    raise MpdeployError(f"{manifest_path} records io {recorded!r} but the ONNX it was built from ({onnx_path}) has "
                        f"{actual!r}: the manifest was edited; rebuild the engine")

"""A small audited engine folder for the ship / Triton tests, made by mpdeploy's own stages.

`make_engine(root)` holds the real chain of the embedded zoo:digits_vit (its weights ship with mpdeploy):
prune (2:4, the mp budget) -> export -> engine-ort (fp32) -> audit (a few digits test images, tiny timing,
no plots; top-1 drop allowed up to 100 points, so it passes), all through `mpdeploy.pipeline.build`.
`use_failed_audit(root)` replaces its audit with a real audit of the same engine that failed (an
impossible speed gate). Both are made once per test process and copied: the sources are relative, so a
copy verifies as the original.

`write_standin_trt_engine(root)` adds an `engine-trt/` beside them: TensorRT cannot build here, so its plan
is a stand-in file (shipped byte for byte), and its manifest records the chain's onnx/ and pruned/ as
sources, as a TensorRT build of that ONNX would. It has no audit (none can run here).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

MODEL = "zoo:digits_vit"
INPUT_SHAPE = (1, 16, 16)  # per sample; the batch dim is dynamic
NUM_CLASSES = 10
FAILED_SPEEDUP = 1000.0  # the failed audit's --min-speedup: no engine meets it
_BUILT: dict[str, Path] = {}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _audit_config(**gates):
    from mpdeploy.audit.config import AuditConfig

    return AuditConfig(data="digits", backend="ort", batch_sizes=(1, 4), warmup=1, repeats=2, calls_per_round=1,
                       min_rounds=2, max_eval_images=32, sensitivity_batch=0, plots=False, max_top1_drop=1.0,
                       **gates)


def _build() -> Path:
    """The chain (and a failed audit of its engine, kept aside) in a folder of this process's own."""
    if "chain" in _BUILT:
        return _BUILT["chain"]
    from mpdeploy.audit.stage import audit
    from mpdeploy.backends.base import BuildConfig
    from mpdeploy.export.stage import ExportConfig
    from mpdeploy.pipeline.build import BuildStageConfig, run_build
    from mpdeploy.prune.stage import PruneConfig

    base = Path(tempfile.mkdtemp(prefix="mpdeploy-ship-engine-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    root = base / "tiny"
    run_build(MODEL, PruneConfig(), ExportConfig(), BuildConfig(precision="fp32", batch_sizes=(1, 4), threads=1),
              BuildStageConfig(backend="ort", out=root, densify=False), audit_config=_audit_config())
    shutil.move(root / "audit", root.parent / "audit.passed")
    audit(root, _audit_config(min_speedup=FAILED_SPEEDUP))
    shutil.move(root / "audit", root.parent / "audit.failed")
    shutil.move(root.parent / "audit.passed", root / "audit")
    _BUILT["chain"] = root
    return root


def make_engine(root: Path) -> Path:
    """engines/<name> with pruned/, onnx/, engine-ort/{sparse,dense}.onnx and a passed audit; returns `root`."""
    shutil.copytree(_build(), root)
    return root


def use_failed_audit(root: Path) -> None:
    """Replace root/audit with the real audit of the same engine that failed (the impossible speed gate)."""
    shutil.rmtree(root / "audit", ignore_errors=True)
    shutil.copytree(_build().parent / "audit.failed", root / "audit")


def write_standin_trt_engine(root: Path) -> Path:
    """root/engine-trt/: a dense-only TensorRT engine whose plan is a stand-in; sources: root's onnx/ and pruned/."""
    from mpdeploy.core import artifacts
    from mpdeploy.core.kinds import EngineFolder
    from mpdeploy.onnx.graph_io import onnx_io

    onnx = EngineFolder.open(root / "engine-ort").onnx()
    ed = root / "engine-trt"
    ed.mkdir()
    (ed / "dense.plan").write_bytes(b"not a real plan, shipped byte for byte")
    extra = {"backend": "trt", "precision": "fp16", "variants": {"dense": "dense.plan"},
             "io": onnx_io(onnx.sparse_model),  # as the engine stage writes it: from the ONNX it builds
             "device": {"name": "gpu0", "gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "10.9.0"},
             "file_sha256": {"dense.plan": sha256(ed / "dense.plan")}}
    artifacts.write_manifest(ed, "engine", {"backend": "trt"}, extra=extra,
                             sources={"onnx": onnx.path, "weights": onnx.required_source("weights")})
    return ed

"""The build pipeline: model -> prune [-> distill] -> export -> engines (sparse + dense twin) -> audit.

    engines/<name>/pruned/            prune artifact (its dense weights file is the dense twin)
    engines/<name>/distilled/         with --distill-epochs: recovered weights (source: pruned/)
    engines/<name>/onnx/              export artifact (source: distilled/ or pruned/)
    engines/<name>/engine-<backend>/  the two engines (sources: onnx/ and the same weights)
    engines/<name>/audit/             the audit (sources: the engine and the weights it was built from)
    engines/<name>/densified/         with --sparse on a backend that reports per-layer sparse use: pruned/ (the layers the engine ran dense,
                                      dense again; sources: the weights and the engine), onnx/, engine-<backend>/,
                                      audit/ -- one densify round, on by default (`densify=False` turns it off)
    engines/<name>/build_summary.json what the last run did per stage (built / reused / skipped, seconds)

Pruning is for the backend (`PruneConfig.backend`): only the layers it can run sparse.

Each stage runs through `mpdeploy.core.runner.run_stage`: one reuse rule (config hash + input manifest
hashes + every file's hash, the chain behind it verified), and writes through `artifacts.atomic_dir`,
so an interrupted run (Ctrl-C, kill -9) never leaves a folder a re-run takes as finished, and the
next run removes its temporaries. `force` rebuilds everything.

The prune stage is keyed by a content hash of the loaded model (every state_dict tensor, plus the
architecture source and input shape): a timm model with random init differs per run unless seeded,
so the RNG is seeded (PruneConfig.seed) before the model is created. Dense-only builds
(`sparse=False`) still run prune and export (the dense twin and the layer report); only the dense
engine is built and the audit is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts, atomic
from mpdeploy.backends.base import BuildConfig, create_backend, resolve_backend
from mpdeploy.engine.stage import build_engines, options_for
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder
from mpdeploy.core.names import BACKENDS, ENGINE_PREFIX, traits
from mpdeploy.audit.run import audit_stage
from mpdeploy.core.runner import StageResult
from mpdeploy.densify.run import densify_stage, sparse_use_check
from mpdeploy.distill.run import distill_stage
from mpdeploy.export.run import export_stage
from mpdeploy.prune.run import prune_stage

logger = logging.getLogger(__name__)

Progress = Callable[..., None]
SUMMARY_SCHEMA = "mpdeploy.build_summary/1"
SUMMARY_FILE = "build_summary.json"
DENSIFIED = "densified"  # the densify round's sub-root: pruned/, onnx/, engine-<backend>/, audit/
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class BuildStageConfig:
    """What the pipeline builds and where; the per-stage configs travel separately."""

    backend: str = "auto"  # auto | trt | torch | ort
    sparse: bool = True  # False: only the dense engine (prune and export still run: see the module doc)
    out_root: Path = Path("engines")
    name: str | None = None  # default: the model's name
    out: Path | None = None  # the engine folder itself (overrides out_root / name)
    force: bool = False
    audit: bool = True
    densify: bool = True  # with sparse: give the layers the engine ran dense back once, rebuild, audit
    slow_layers: Path | None = None  # layers whose sparse kernel timed slower on the GPU (densify gives them back)

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise MpdeployError(f"unknown backend {self.backend!r}; choose auto or one of {', '.join(BACKENDS)}")

    @property
    def variants(self) -> tuple[str, ...]:
        return ("sparse", "dense") if self.sparse else ("dense",)


@dataclass
class BuildResult:
    root: Path
    backend: str
    backend_reason: str
    stages: list[StageResult]

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)


def model_fingerprint(loaded) -> str:
    """Content hash of a loaded model: architecture source, input shape, every state_dict tensor's bytes."""
    import torch

    h = hashlib.sha256()
    source = {k: v for k, v in (loaded.source or {}).items() if k in ("kind", "name", "kwargs")}
    identity = {"source": source, "input_shape": list(loaded.input_shape)}
    if (loaded.data_config or {}).get("data_spec"):  # the user's preprocessing changes calibration
        identity["data_spec"] = loaded.data_config["data_spec"]
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for key, value in sorted(loaded.module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _safe_name(name: str) -> str:
    cleaned = _NAME_RE.sub("_", name).strip("._")
    if not cleaned:
        raise MpdeployError(f"cannot make an engine folder name from {name!r}; pass --name or --out")
    return cleaned


def load_seeded_model(model, seed: int):
    """The model to prune (a source, a ModelSpec or a LoadedModel), random init seeded so a re-run matches."""
    import torch

    from mpdeploy.models.spec import LoadedModel, ModelSpec
    from mpdeploy.models.load import load_model

    if isinstance(model, LoadedModel):
        return model
    spec = ModelSpec(source=model) if isinstance(model, str) else model
    # Random-init weights (timm without pretrained weights) must be the same on every run for reuse.
    torch.manual_seed(seed)
    loaded = load_model(spec)
    if loaded.source.get("weights") == "random":
        loaded.source["init_seed"] = seed
    return loaded


def _check_root(root: Path) -> None:
    """The engine root holds stage folders; refuse a user's folder (its files would sit among ours)."""
    if root.exists() and not root.is_dir():
        raise MpdeployError(f"--out {root} is a file; pass a folder (e.g. engines/<name>)")
    if not root.is_dir():
        return
    ours = {"pruned", "distilled", "onnx", "audit", "analyze", DENSIFIED, SUMMARY_FILE}
    foreign = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in ours
               and not p.name.startswith(ENGINE_PREFIX)]
    if foreign:
        raise MpdeployError(f"--out {root} holds files mpdeploy did not write ({', '.join(sorted(foreign)[:3])}); "
                            "nothing was changed: choose a new or empty folder")


def _audit_config(audit_config, backend_name: str, build_config: BuildConfig):
    from mpdeploy.audit.config import AuditConfig

    if audit_config is None:
        # The engines serve exactly these batch sizes (a TensorRT profile ends at the largest).
        return AuditConfig(backend=backend_name, batch_sizes=tuple(build_config.batch_sizes))
    return dataclasses.replace(audit_config, backend=backend_name)


def prune_for(prune_config, backend_name: str, precision: str, build_config: BuildConfig):
    """Prune only what `backend_name` runs sparse (unless the config names a backend already). Dense-only builds
    too: their prune is the one a later --sparse build of the same backend reuses."""
    if prune_config.backend is not None:
        return prune_config
    options = tuple((k, v) for k, v in build_config.backend_options if k in ("kernel", "conv1x1"))
    return dataclasses.replace(prune_config, backend=backend_name, backend_precision=precision, backend_options=options)


def export_for(export_config, backend_name: str, precision: str, build_config: BuildConfig):
    """The export a backend that builds from the precision's own ONNX needs: that precision's files beside
    the FP32 ones (unless the config asks for a precision already). INT8 calibrates on --calib, else the
    pruned artifact's data."""
    if not traits(backend_name).precision_onnx or precision == "fp32" or export_config.precision != "fp32":
        return export_config
    return dataclasses.replace(export_config, precision=precision, calib=export_config.calib or build_config.calib)


def _audit(engine_dir: Path, audit_config, build_config: BuildConfig, stage: BuildStageConfig, progress,
           name: str = "audit") -> StageResult:
    if audit_config is None:
        return StageResult(name, "skipped", 0.0, None, {"reason": "--no-audit"})
    if "sparse" not in stage.variants:
        logger.info("audit skipped: a dense-only build has no sparse engine to compare")
        return StageResult(name, "skipped", 0.0, None, {"reason": "dense-only build (no --sparse)"})
    result = audit_stage(engine_dir, audit_config, build_config, stage.force, progress)
    result.stage = name
    return result


def _densify_round(root: Path, engine: StageResult, first_audit: StageResult, backend_name: str, backend_reason: str,
                   export_config, build_config: BuildConfig, audit_config, stage: BuildStageConfig,
                   progress) -> list[StageResult]:
    """Once: give back the layers the engine ran dense, export, rebuild, audit; compare with the first round."""
    if not stage.sparse:
        return []
    if not stage.densify:
        return [StageResult("densify", "skipped", 0.0, None, {"reason": "--no-densify"})]
    if traits(backend_name).sparse_use_report is None:
        why = traits(backend_name).no_sparse_note
        return [StageResult("densify", "skipped", 0.0, None, {
            "reason": f"{backend_name}: no per-layer report of sparse use{f' ({why})' if why else ''}"})]
    from mpdeploy.densify.stage import DensifyConfig

    sub = root / DENSIFIED
    config = DensifyConfig(slow_layers=str(stage.slow_layers) if stage.slow_layers else None)
    densified = densify_stage(engine.path, sub / "pruned", config, stage.force, progress)
    if densified.status == "skipped":
        return [densified]
    out = [densified]
    exported = export_stage(export_config, sub / "pruned", sub / "onnx", stage.force, progress)
    exported.stage = "export:densified"
    rebuilt = build_engines(sub / "onnx", backend_name, build_config, variants=stage.variants, force=stage.force,
                            progress=progress, backend_reason=backend_reason)
    rebuilt.stage = "build:densified"
    audited = _audit(rebuilt.path, audit_config, build_config, stage, progress, "audit:densified")
    out += [exported, rebuilt, audited]
    densified.details["check"] = sparse_use_check(engine.path, rebuilt.path, densified.details)
    densified.details["before_after"] = before_after(first_audit, audited)
    return out


def before_after(first: StageResult, second: StageResult) -> dict[str, list]:
    """Top-1 and speed of the first engine and the densified one, from their audits ([before, after])."""
    def numbers(audit: StageResult) -> dict[str, Any]:
        summary = audit.details.get("summary") or {}
        speed = {int(k): v for k, v in (summary.get("speedup_p50") or {}).items() if isinstance(v, (int, float))}
        return {"passed": audit.details.get("passed"), "top1_sparse": summary.get("top1_sparse"),
                "top1_dense": summary.get("top1_dense"), "agreement": summary.get("agreement"),
                "speedup_p50_largest_batch": speed[max(speed)] if speed else None,
                "largest_batch": max(speed) if speed else None}

    a, b = numbers(first), numbers(second)
    return {k: [a[k], b[k]] for k in a}


def run_build(model, prune_config, export_config, build_config: BuildConfig, stage: BuildStageConfig,
              progress: Progress | None = None, distill_config=None, audit_config=None) -> BuildResult:
    """Run every stage; returns where it went and, per stage, whether it was built or reused.

    `audit_config` (an AuditConfig: evaluation data, batch sizes, gates, ...) defaults to digits at the
    engines' batch sizes; its backend is always the one built here. Run-time options in `build_config`
    (threads, providers) reach the engines' runners and the audit's."""
    backend_name, backend_reason = resolve_backend(stage.backend)  # fail fast, before loading anything
    build_config = options_for(backend_name, build_config)
    precision = create_backend(backend_name).resolve_precision(build_config)
    # TensorRT 10/11 build strongly typed networks from the precision's own ONNX (FP16 / BF16 / INT8 Q/DQ);
    # ort runs the same fp16 / int8 files.
    wanted = export_for(export_config, backend_name, precision, build_config)
    if wanted != export_config:
        logger.info("%s + %s: exporting %s beside the FP32 files", backend_name, precision,
                    OnnxFolder.model_name("sparse", precision))
    export_config = wanted
    logger.info("backend %s", backend_reason)
    prune_config = prune_for(prune_config, backend_name, precision, build_config)
    audit_config = _audit_config(audit_config, backend_name, build_config) if stage.audit else None
    if stage.out is not None:
        _check_root(Path(stage.out))

    loaded = load_seeded_model(model, prune_config.seed)
    model_hash = model_fingerprint(loaded)
    root = Path(stage.out) if stage.out else Path(stage.out_root) / _safe_name(stage.name or loaded.name)
    _check_root(root)
    artifacts.check_replaceable(root / "pruned", "pruned")  # an --out of a user's files fails before work
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MpdeployError(atomic.os_error_message(exc, root) or f"cannot create {root} ({exc.strerror}); "
                            "choose another --out") from None

    stages = [prune_stage(loaded, model_hash, prune_config, root / "pruned", stage.force, progress)]
    del loaded  # pruned in place; the artifact is what later stages read
    weights = root / "pruned"
    if distill_config is not None:
        stages.append(distill_stage(distill_config, weights, root / "distilled", stage.force, progress))
        weights = root / "distilled"
    stages.append(export_stage(export_config, weights, root / "onnx", stage.force, progress))
    engine = build_engines(root / "onnx", backend_name, build_config, variants=stage.variants, force=stage.force,
                           progress=progress, backend_reason=backend_reason)
    stages.append(engine)
    stages.append(_audit(engine.path, audit_config, build_config, stage, progress))
    stages += _densify_round(root, engine, stages[-1], backend_name, backend_reason, export_config, build_config,
                             audit_config, stage, progress)
    result = BuildResult(root, backend_name, backend_reason, stages)
    atomic.write_json(root / SUMMARY_FILE, {
        "schema": SUMMARY_SCHEMA,
        "backend": backend_name,
        "backend_reason": backend_reason,
        "model_sha256": model_hash,
        "stages": [{"stage": s.stage, "status": s.status, "seconds": round(s.seconds, 3),
                    "path": str(s.path) if s.path else None, "details": s.details} for s in stages],
    })
    return result

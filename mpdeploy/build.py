"""The build pipeline: model -> prune -> export -> build (sparse + dense twin) -> audit, into engines/<name>/.

    engines/<name>/pruned/            prune artifact (its dense.safetensors is the dense twin)
    engines/<name>/onnx/              export artifact: model.onnx (sparse), model.dense.onnx, sparsity.json
    engines/<name>/engine-<backend>/  the two engines, build_report.json, manifest.json (kind "engine")
    engines/<name>/audit/             written by mpdeploy.audit
    engines/<name>/build_summary.json what the last run did per stage (built / reused / skipped, seconds)

Every stage folder is written through `artifacts.atomic_dir`, so an interrupted run (Ctrl-C, kill -9)
never leaves a folder a re-run takes as finished. A re-run reuses a stage when its folder's manifest
has the same config hash and the same input hashes; `force` rebuilds everything.

Reuse keys: the prune stage is keyed by a content hash of the loaded model (every state_dict tensor,
plus the architecture source and input shape), not by its name: a timm model with random init differs
per run unless seeded, so the RNG is seeded (PruneConfig.seed) before the model is created, and the
seed is recorded in the prune manifest's model source. Export is keyed by the prune manifest's hash;
the engine by the export and prune manifests' hashes and the device fingerprint (GPU model + TensorRT
version for plans, ONNX Runtime version for ort), so an engine is never reused on a machine it was not
built for. Rebuilding an engine removes the old audit/ (it no longer describes the engine).

Dense-only builds (`sparse=False`) still run prune: its artifact carries the dense twin and the layer
report, the export writes both ONNX files, and only the dense engine is built. A later `--sparse` run
then reuses prune and export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpdeploy import artifacts
from mpdeploy.backends.base import REGISTRY, BuildConfig, BuildInputs, backend_class, create_backend, resolve_backend
from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
ENGINE_KIND = "engine"
REPORT_SCHEMA = "mpdeploy.build_report/1"
SUMMARY_SCHEMA = "mpdeploy.build_summary/1"
SUMMARY_FILE = "build_summary.json"
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

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in REGISTRY:
            raise MpdeployError(f"unknown backend {self.backend!r}; choose auto or one of {', '.join(REGISTRY)}")

    @property
    def variants(self) -> tuple[str, ...]:
        return ("sparse", "dense") if self.sparse else ("dense",)


@dataclass
class StageResult:
    stage: str
    status: str  # "built" | "reused" | "skipped"
    seconds: float
    path: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    root: Path
    backend: str
    backend_reason: str
    stages: list[StageResult]

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)


# ---------------------------------------------------------------------------------------------------
# helpers


def model_fingerprint(loaded) -> str:
    """Content hash of a loaded model: architecture source, input shape, every state_dict tensor's bytes."""
    import torch

    h = hashlib.sha256()
    source = {k: v for k, v in (loaded.source or {}).items() if k in ("kind", "name", "kwargs")}
    h.update(json.dumps({"source": source, "input_shape": list(loaded.input_shape)}, sort_keys=True,
                        default=str).encode())
    for key, value in sorted(loaded.module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>-*` folders next to `target` left by a process that no longer runs (kill -9)."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        match = re.match(rf"\.{re.escape(target.name)}\.tmp-(\d+)-", tmp.name)
        if not match or not tmp.is_dir():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        logger.info("removed %d unfinished %s folder(s) from an interrupted run", len(removed), target.name)
    return removed


def engine_is_complete(folder: Path, config_hash: str, inputs: dict[str, str]) -> bool:
    """Like artifacts.is_complete for engine folders, whose manifest `variants` maps variants to files
    (the engine contract) and whose hashes live in `file_sha256`."""
    try:
        manifest = artifacts.read_manifest(folder, ENGINE_KIND, verify=False)
    except MpdeployError:
        return False
    if manifest.get("config_hash") != config_hash or manifest.get("inputs") != dict(inputs):
        return False
    hashes = manifest.get("file_sha256") or {}
    if not manifest.get("variants") or any(rel not in hashes for rel in manifest["variants"].values()):
        return False
    for rel, digest in hashes.items():
        path = Path(folder) / rel
        if not path.is_file() or artifacts.sha256_file(path) != digest:
            return False
    return True


def _onnx_io(onnx_path: Path) -> dict[str, Any]:
    """The engine manifest's `io` from the exported ONNX (names, float32, -1 for the dynamic batch)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}

    def spec(value) -> dict[str, Any]:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
        return {"name": value.name, "dtype": dtypes.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def _file_sha256(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): artifacts.sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != artifacts.MANIFEST}


def _safe_name(name: str) -> str:
    cleaned = _NAME_RE.sub("_", name).strip("._")
    if not cleaned:
        raise MpdeployError(f"cannot make an engine folder name from {name!r}; pass --name or --out")
    return cleaned


def _options_for(backend: str, config: BuildConfig) -> BuildConfig:
    """Keep only the backend options the chosen backend knows (CLI flags of other backends are dropped)."""
    known = backend_class(backend).options
    keep = {k: v for k, v in config.backend_options if k in known}
    dropped = sorted(k for k, _ in config.backend_options if k not in known)
    if dropped:
        logger.info("options %s do not apply to backend %s; ignored", ", ".join(dropped), backend)
    return dataclasses.replace(config, backend_options=tuple(keep.items()))


def _step(progress: Progress | None, prefix: str) -> Progress:
    """Prefix a stage's progress steps; extra fields (loss, images/s, ...) pass through."""
    if progress is None:
        return lambda step, done, total, **fields: None
    return lambda step, done, total, **fields: progress(
        f"{prefix}: {step}" if step != prefix else prefix, done, total, **fields)


# ---------------------------------------------------------------------------------------------------
# stages


def _stage_prune(loaded, model_hash, prune_config, root, force, progress) -> StageResult:
    from mpdeploy.prune import prune

    folder = root / "pruned"
    config_hash = artifacts.sha256_json(artifacts.to_jsonable(prune_config))
    inputs = {"model": model_hash}
    t0 = time.perf_counter()
    clean_stale_temps(folder)
    if not force and artifacts.is_complete(folder, "pruned", config_hash, inputs):
        status = "reused"
    else:
        prune(loaded, prune_config, folder, progress=_step(progress, "prune"), source_hash=model_hash)
        status = "built"
    totals = artifacts.read_manifest(folder, "pruned", verify=False)["totals"]
    details = {k: totals.get(k) for k in ("pruned_layers", "sparse_layers", "skipped_layers", "mac_reduction",
                                          "sparse_execution_mac_reduction")}
    return StageResult("prune", status, time.perf_counter() - t0, folder, details)


def _stage_distill(distill_config, root, force, progress) -> StageResult:
    """Short recovery into `distilled/` (a pruned-kind artifact); `pruned/` stays as pruning left it,
    so a later build without distillation never picks up distilled weights."""
    from dataclasses import asdict

    from mpdeploy.distill import distill

    pruned, folder = root / "pruned", root / "distilled"
    t0 = time.perf_counter()
    clean_stale_temps(folder)
    ignore = ("resume", "device")
    wanted = {k: v for k, v in artifacts.to_jsonable(asdict(distill_config)).items() if k not in ignore}
    reusable = False
    if not force and folder.is_dir():
        try:
            record = artifacts.read_manifest(folder, "pruned", verify=True).get("distill") or {}
            done = {k: v for k, v in (record.get("config") or {}).items() if k not in (*ignore, "resolved")}
            reusable = record.get("input_manifest_sha256") == artifacts.manifest_hash(pruned) and done == wanted
        except MpdeployError:
            reusable = False
    if reusable:
        status = "reused"
    else:
        distill(pruned, distill_config, out_dir=folder, progress=_step(progress, "distill"))
        status = "built"
    record = artifacts.read_manifest(folder, "pruned", verify=False)["distill"]
    details = {"epochs": distill_config.epochs, "top1_before": record.get("top1_before"),
               "top1_after": record.get("top1_after"), "top1_teacher": record.get("top1_teacher")}
    return StageResult("distill", status, time.perf_counter() - t0, folder, details)


def _stage_export(export_config, root, source, force, progress) -> StageResult:
    from mpdeploy.export import export

    pruned, folder = source, root / "onnx"
    config_hash = artifacts.sha256_json(artifacts.to_jsonable(export_config))
    inputs = {"pruned_manifest": artifacts.manifest_hash(pruned)}
    t0 = time.perf_counter()
    clean_stale_temps(folder)
    step = _step(progress, "export")
    if not force and artifacts.is_complete(folder, "onnx", config_hash, inputs):
        status = "reused"
    else:
        step("export", 0, 1)
        export(pruned, export_config, folder)
        status = "built"
    step("export", 1, 1)
    manifest = artifacts.read_manifest(folder, "onnx", verify=False)
    summary = manifest.get("summary") or {}
    details = {k: summary.get(k) for k in ("annotated", "runs_sparse", "eligible_2_4")}
    details["ort_max_abs_diff"] = (manifest.get("ort_check") or {}).get("max_abs_diff_sparse")
    return StageResult("export", status, time.perf_counter() - t0, folder, details)


def _engine_details(report: dict[str, Any]) -> dict[str, Any]:
    details: dict[str, Any] = {"precision": report.get("precision"), "warnings": len(report.get("warnings") or [])}
    for variant, info in (report.get("variants") or {}).items():
        details[f"{variant}_bytes"] = info.get("size_bytes")
        if info.get("eligible") is not None:
            details["eligible"] = len(info["eligible"])
            details["picked_sparse"] = len(info.get("picked_sparse") or [])
        if "converted_layers" in info and variant == "sparse":
            details["converted_layers"] = len(info["converted_layers"])
    providers = (report.get("device") or {}).get("providers_preferred")
    if providers:
        details["providers"] = providers
    return details


def _stage_build(backend_name, backend_reason, variants, build_config, root, source, force, progress) -> StageResult:
    pruned, onnx_dir = source, root / "onnx"
    folder = root / f"engine-{backend_name}"
    backend = create_backend(backend_name)
    precision = backend.resolve_precision(build_config)
    backend.resolve_options(build_config)  # unknown option values fail before any work
    device = backend.device_info()
    config = {
        "backend": backend_name,
        "variants": list(variants),
        "precision": precision,
        "build": build_config.build_fields(),
    }
    config_hash = artifacts.sha256_json(artifacts.to_jsonable(config))
    onnx_hash, pruned_hash = artifacts.manifest_hash(onnx_dir), artifacts.manifest_hash(pruned)
    inputs = {"onnx": onnx_hash, "pruned_manifest": pruned_hash,
              "device": artifacts.sha256_json(device.get("fingerprint", device))}
    t0 = time.perf_counter()
    clean_stale_temps(folder)
    step = _step(progress, f"build {backend_name}")
    if not force and engine_is_complete(folder, config_hash, inputs):
        step(f"build {backend_name}", len(variants), len(variants))
        report = artifacts.read_json(folder / "build_report.json", what="build report")
        return StageResult("build", "reused", time.perf_counter() - t0, folder, _engine_details(report))

    onnx_manifest = artifacts.read_manifest(onnx_dir, "onnx", verify=False)
    pruned_manifest = artifacts.read_manifest(pruned, "pruned", verify=False)
    sparsity = artifacts.read_json(onnx_dir / "sparsity.json", what="sparsity record")
    with artifacts.atomic_dir(folder) as tmp:
        files, per_variant, warnings = {}, {}, []
        for i, variant in enumerate(variants):
            step(f"build {backend_name}", i, len(variants))
            v0 = time.perf_counter()
            built = backend.build(BuildInputs(onnx_dir=onnx_dir, pruned_dir=pruned), variant, tmp, build_config)
            seconds = time.perf_counter() - v0
            files[variant] = built.file
            per_variant[variant] = {"file": built.file, "build_seconds": round(seconds, 3),
                                    "size_bytes": (tmp / built.file).stat().st_size, **built.report}
            warnings += [f"{variant}: {w}" for w in built.report.get("warnings") or []]
            logger.info("built %s %s engine in %.1fs", backend_name, variant, seconds)
        step(f"build {backend_name}", len(variants), len(variants))
        notes = []
        if backend_name == "trt":
            notes.append("TensorRT finds 2:4 from the zeros in dense weights: the sparse engine is built from "
                         "model.onnx with SPARSE_WEIGHTS on, the dense twin from model.dense.onnx with it off")
        if device.get("note"):
            notes.append(device["note"])
        if not tuple(variants) == ("sparse", "dense"):
            notes.append("dense-only build (no --sparse): prune and export ran for the dense twin; no sparse engine")
        report = {
            "schema": REPORT_SCHEMA,
            "backend": backend_name,
            "backend_reason": backend_reason,
            "device": device,
            "precision": precision,
            "flags": {"variants": list(variants), "batch_sizes": list(build_config.batch_sizes),
                      "profile_batches": list(build_config.profile_batches),
                      "backend_options": backend.resolve_options(build_config),
                      "workspace_mib": build_config.workspace_mib, "calib": build_config.calib},
            "build_seconds": {v: per_variant[v]["build_seconds"] for v in variants},
            "engine_bytes": {v: per_variant[v]["size_bytes"] for v in variants},
            "variants": per_variant,
            "warnings": warnings,
            "notes": notes,
            "onnx_sparsity_summary": sparsity.get("summary"),
            "prune_totals": pruned_manifest.get("totals"),
        }
        artifacts.write_json(tmp / "build_report.json", report)
        io = _onnx_io(onnx_dir / "model.onnx")
        artifacts.write_manifest(
            tmp, ENGINE_KIND, config, inputs=inputs,
            extra={
                "backend": backend_name,
                "precision": precision,
                "variants": files,  # the engine contract: variant -> file name (hashes in files / file_sha256)
                "io": io,
                "device": device,
                "sources": {"onnx_sha256": onnx_hash, "pruned_manifest_sha256": pruned_hash},
                "file_sha256": _file_sha256(tmp),
                "backend_reason": backend_reason,
                "model": onnx_manifest.get("model"),
            },
        )
    stale_audit = root / "audit"
    if stale_audit.exists():
        shutil.rmtree(stale_audit, ignore_errors=True)
        logger.info("removed %s: it audited the engine this build replaced", stale_audit)
    return StageResult("build", "built", time.perf_counter() - t0, folder, _engine_details(report))


def _audit_api():
    """(audit, AuditConfig) or None while mpdeploy.audit is not there yet."""
    try:
        from mpdeploy.audit import AuditConfig, audit
    except ModuleNotFoundError as exc:
        if exc.name != "mpdeploy.audit":
            raise
        return None
    except ImportError as exc:  # the module exists but lacks the names (being written)
        logger.info("mpdeploy.audit is incomplete (%s)", exc)
        return None
    return audit, AuditConfig


def _audit_reusable(folder: Path, config, engine_hash: str) -> bool:
    try:
        manifest = artifacts.read_manifest(folder, "audit", verify=True)
    except MpdeployError:
        return False
    same_config = manifest.get("config_hash") == artifacts.sha256_json(artifacts.to_jsonable(config))
    return same_config and engine_hash in json.dumps(manifest.get("inputs") or {})


def _stage_audit(backend_name, root, enabled, variants, batch_sizes, force, progress) -> StageResult:
    if not enabled:
        return StageResult("audit", "skipped", 0.0, None, {"reason": "--no-audit"})
    if "sparse" not in variants:
        logger.info("audit skipped: a dense-only build has no sparse engine to compare")
        return StageResult("audit", "skipped", 0.0, None, {"reason": "dense-only build (no --sparse)"})
    api = _audit_api()
    if api is None:
        logger.info("audit skipped: mpdeploy.audit is not available in this installation")
        return StageResult("audit", "skipped", 0.0, None, {"reason": "mpdeploy.audit not available"})
    audit, audit_config_cls = api
    # The engines serve exactly these batch sizes (a TensorRT profile ends at the largest).
    config = audit_config_cls(backend=backend_name, batch_sizes=tuple(batch_sizes))
    folder = root / "audit"
    engine_hash = artifacts.manifest_hash(root / f"engine-{backend_name}")
    t0 = time.perf_counter()
    step = _step(progress, "audit")
    if not force and _audit_reusable(folder, config, engine_hash):
        status = "reused"
    else:
        step("audit", 0, 1)
        folder = Path(audit(root, config, progress=step))
        status = "built"
    step("audit", 1, 1)
    details: dict[str, Any] = {}
    result = folder / "audit.json"
    if result.exists():
        data = artifacts.read_json(result, what="audit")
        details = {"passed": data.get("passed"), "failures": data.get("failures") or [],
                   "summary": data.get("summary") or {}}
    return StageResult("audit", status, time.perf_counter() - t0, folder, details)


# ---------------------------------------------------------------------------------------------------
# the pipeline


def _load(model, seed: int):
    import torch

    from mpdeploy.models import LoadedModel, ModelSpec, load_model

    if isinstance(model, LoadedModel):
        return model
    spec = ModelSpec(source=model) if isinstance(model, str) else model
    # Random-init weights (timm without pretrained weights) must be the same on every run for reuse.
    torch.manual_seed(seed)
    loaded = load_model(spec)
    if loaded.source.get("weights") == "random":
        loaded.source["init_seed"] = seed
    return loaded


def run_build(model, prune_config, export_config, build_config: BuildConfig, stage: BuildStageConfig,
              progress: Progress | None = None, distill_config=None) -> BuildResult:
    """Run every stage; returns where it went and, per stage, whether it was built or reused."""
    backend_name, backend_reason = resolve_backend(stage.backend)  # fail fast, before loading anything
    build_config = _options_for(backend_name, build_config)
    precision = create_backend(backend_name).resolve_precision(build_config)
    if backend_name in ("trt", "ort") and precision != "fp32" and export_config.precision == "fp32":
        # TensorRT 10/11 build strongly typed networks from the precision's own ONNX (FP16 / BF16 / INT8 Q/DQ);
        # ort runs the same fp16 / int8 files. INT8 calibrates on --calib, else the pruned artifact's data.
        export_config = dataclasses.replace(export_config, precision=precision,
                                            calib=export_config.calib or build_config.calib)
        logger.info("%s + %s: exporting model.%s.onnx beside the FP32 files", backend_name, precision, precision)
    logger.info("backend %s", backend_reason)

    loaded = _load(model, prune_config.seed)
    model_hash = model_fingerprint(loaded)
    root = Path(stage.out) if stage.out else Path(stage.out_root) / _safe_name(stage.name or loaded.name)
    root.mkdir(parents=True, exist_ok=True)

    stages = [_stage_prune(loaded, model_hash, prune_config, root, stage.force, progress)]
    del loaded  # pruned in place; the artifact is what later stages read
    source = root / "pruned"
    if distill_config is not None:
        stages.append(_stage_distill(distill_config, root, stage.force, progress))
        source = root / "distilled"
    stages.append(_stage_export(export_config, root, source, stage.force, progress))
    stages.append(_stage_build(backend_name, backend_reason, stage.variants, build_config, root, source,
                               stage.force, progress))
    stages.append(_stage_audit(backend_name, root, stage.audit, stage.variants, build_config.batch_sizes,
                               stage.force, progress))
    result = BuildResult(root, backend_name, backend_reason, stages)
    artifacts.write_json(root / SUMMARY_FILE, {
        "schema": SUMMARY_SCHEMA,
        "backend": backend_name,
        "backend_reason": backend_reason,
        "model_sha256": model_hash,
        "stages": [{"stage": s.stage, "status": s.status, "seconds": round(s.seconds, 3),
                    "path": str(s.path) if s.path else None, "details": s.details} for s in stages],
    })
    return result


def build_pipeline(model, prune_config, export_config, build_config: BuildConfig, backend: str = "auto",
                   sparse: bool = True, out_root: Path = Path("engines"), name: str | None = None,
                   force: bool = False, audit: bool = True, progress: Progress | None = None,
                   out: Path | None = None, distill_config=None) -> Path:
    """prune -> export -> build -> audit for `model` (a ModelSpec, a source string, or a LoadedModel).

    Returns the engine folder (`out_root/<name>`, or `out`).
    """
    stage = BuildStageConfig(backend=backend, sparse=sparse, out_root=Path(out_root), name=name, out=out,
                             force=force, audit=audit)
    return run_build(model, prune_config, export_config, build_config, stage, progress, distill_config).root

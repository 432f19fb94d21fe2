"""The engine stage: an `onnx/` artifact (and the weights it was exported from) -> `engine-<backend>/`.

    engine-<backend>/  one engine file per variant (sparse, dense), build_report.json, manifest.json

The manifest records its sources ("onnx", and "weights": the exact pruned or distilled artifact the
ONNX came from, which the torch backend builds from and the audit compares with), the run-time
options (threads, providers) the engines are to be run with, and the device fingerprint, which enters
the reuse key so an engine is never reused on a machine it was not built for. `mpdeploy engine` runs
this stage alone; `mpdeploy build` runs it after export.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts, atomic
from mpdeploy.backends.base import Backend, BuildConfig, BuildInputs, backend_class, create_backend
from mpdeploy.core.names import engine_folder_name
from mpdeploy.core.kinds import EngineFolder, OnnxFolder
from mpdeploy.core.runner import Progress, StageResult, run_stage, step_progress
from mpdeploy.onnx.graph_io import onnx_io

logger = logging.getLogger(__name__)

ENGINE_KIND = "engine"
REPORT_SCHEMA = "mpdeploy.build_report/1"


def options_for(backend: str, config: BuildConfig) -> BuildConfig:
    """Keep only the backend options the chosen backend knows (CLI flags of other backends are dropped)."""
    known = backend_class(backend).options
    keep = {k: v for k, v in config.backend_options if k in known}
    dropped = sorted(k for k, _ in config.backend_options if k not in known)
    if dropped:
        logger.info("options %s do not apply to backend %s; ignored", ", ".join(dropped), backend)
    return dataclasses.replace(config, backend_options=tuple(keep.items()))


def runtime_options(config: BuildConfig) -> dict[str, Any]:
    """What a runner of these engines needs beyond the build (recorded; the audit and ship read it)."""
    return {"threads": config.threads, "backend_options": [list(kv) for kv in config.backend_options]}


def engine_details(report: dict[str, Any]) -> dict[str, Any]:
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


def _notes(backend: Backend, device: dict[str, Any], variants) -> list[str]:
    notes = [backend.build_note] if backend.build_note else []
    if device.get("note"):
        notes.append(device["note"])
    if tuple(variants) != ("sparse", "dense"):
        notes.append("dense-only build (no --sparse): prune and export ran for the dense twin; no sparse engine")
    return notes


@dataclass(frozen=True)
class EngineJob:
    """One engine folder to write, everything about it decided before the first build."""

    backend: Backend
    reason: str  # why this backend (asked for, or auto's pick)
    variants: tuple[str, ...]
    build_config: BuildConfig
    precision: str
    device: dict[str, Any]
    onnx: OnnxFolder
    weights_dir: Path
    folder: Path
    config: dict[str, Any]  # the manifest's config (with `inputs`, the reuse key)
    inputs: dict[str, str]


def _write_engines(job: EngineJob, step) -> dict[str, Any]:
    backend, name, variants, build_config = job.backend, job.backend.name, job.variants, job.build_config
    sources = {"onnx": job.onnx.path, "weights": job.weights_dir}
    with artifacts.atomic_dir(job.folder, kind=ENGINE_KIND) as tmp:
        files, per_variant, warnings = {}, {}, []
        for i, variant in enumerate(variants):
            step(f"build {name}", i, len(variants))
            v0 = time.perf_counter()
            built = backend.build(BuildInputs(onnx_dir=job.onnx.path, pruned_dir=job.weights_dir), variant, tmp,
                                  build_config)
            seconds = time.perf_counter() - v0
            files[variant] = built.file
            per_variant[variant] = {"file": built.file, "build_seconds": round(seconds, 3),
                                    "size_bytes": (tmp / built.file).stat().st_size, **built.report}
            warnings += [f"{variant}: {w}" for w in built.report.get("warnings") or []]
            logger.info("built %s %s engine in %.1fs", name, variant, seconds)
        step(f"build {name}", len(variants), len(variants))
        weights_manifest = artifacts.read_manifest(job.weights_dir, "pruned", verify=False)
        report = {
            "schema": REPORT_SCHEMA, "backend": name, "backend_reason": job.reason, "device": job.device,
            "precision": job.precision,
            "flags": {"variants": list(variants), "batch_sizes": list(build_config.batch_sizes),
                      "profile_batches": list(build_config.profile_batches),
                      "backend_options": backend.resolve_options(build_config),
                      "workspace_mib": build_config.workspace_mib, "calib": build_config.calib},
            "build_seconds": {v: per_variant[v]["build_seconds"] for v in variants},
            "engine_bytes": {v: per_variant[v]["size_bytes"] for v in variants},
            "variants": per_variant, "warnings": warnings, "notes": _notes(backend, job.device, variants),
            "onnx_sparsity_summary": job.onnx.sparsity().get("summary"),
            "prune_totals": weights_manifest.get("totals"),
        }
        atomic.write_json(tmp / EngineFolder.REPORT, report)
        artifacts.write_manifest(
            tmp, ENGINE_KIND, job.config, inputs=job.inputs, sources=sources, target=job.folder,
            extra={"backend": name, "precision": job.precision,
                   "variants": files,  # the engine contract: variant -> file name (hashed in `files`)
                   "io": onnx_io(job.onnx.sparse_model), "device": job.device,
                   "runtime": runtime_options(build_config),
                   "file_sha256": {rel: artifacts.sha256_file(tmp / rel) for rel in files.values()},
                   "backend_reason": job.reason, "model": job.onnx.manifest.get("model")},
        )
    return report


def build_engines(onnx_dir: Path, backend_name: str, build_config: BuildConfig, out: Path | None = None,
                  variants=("sparse", "dense"), force: bool = False, progress: Progress | None = None,
                  backend_reason: str = "asked for") -> StageResult:
    """Build the `variants` engines of `onnx_dir` on `backend_name` into `out` (default: engine-<backend>/
    beside onnx/). Reused when the onnx, its weights, the build config and the device are the same."""
    onnx = OnnxFolder.open(onnx_dir)  # verified, with the weights it came from
    weights_dir = onnx.required_source("weights")
    build_config = options_for(backend_name, build_config)
    folder = Path(out) if out is not None else Path(onnx_dir).parent / engine_folder_name(backend_name)
    backend = create_backend(backend_name)
    precision = backend.resolve_precision(build_config)
    backend.resolve_options(build_config)  # unknown option values fail before any work
    device = backend.device_info()
    config = {"backend": backend_name, "variants": list(variants), "precision": precision,
              "build": build_config.build_fields()}
    inputs = {"onnx": artifacts.manifest_hash(onnx.path), "pruned_manifest": artifacts.manifest_hash(weights_dir),
              "device": artifacts.sha256_json(device.get("fingerprint", device))}
    step = step_progress(progress, f"build {backend_name}")
    made: dict[str, Any] = {}

    job = EngineJob(backend, backend_reason, tuple(variants), build_config, precision, device, onnx, weights_dir,
                    folder, config, inputs)

    def make() -> None:
        made["report"] = _write_engines(job, step)

    result = run_stage("build", folder, ENGINE_KIND, config, make, force=force, inputs=inputs,
                       sources={"onnx": onnx.path, "weights": weights_dir})
    if result.status == "reused":  # run-time options are not in the reuse key: callers pass theirs to runners
        step(f"build {backend_name}", len(variants), len(variants))
    report = made.get("report") or atomic.read_json(folder / EngineFolder.REPORT, what="build report")
    result.details = engine_details(report)
    return result

"""What `mpdeploy ship` reads from an engine directory, verified before the repository is touched.

Which `engine-<backend>/` to ship, verified as an artifact (every file, its self-hash, its sources),
and the audit that must be tied to exactly that engine by its manifest hash. --force overrides a failed
or missing audit verdict, never integrity: a forged, stripped or foreign audit and an edited engine are
refused either way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.artifacts import sha256_file
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import AuditFolder, EngineFolder, engine_backend_present, engine_backends
from mpdeploy.core.names import BACKENDS, engine_folder_name
from mpdeploy.onnx.graph_io import check_recorded_io

# Its warnings are ship's: the CLI prints the logger name on every line.
logger = logging.getLogger("mpdeploy.serve.ship")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MpdeployError(f"cannot read {what} {path}: {exc}; rebuild it") from exc
    if not isinstance(data, dict):
        raise MpdeployError(f"{what} {path} is not a JSON object; rebuild it")
    return data


def read_audit(engine_dir: Path) -> AuditFolder | None:
    """The audit, opened through its verified artifact: every file hashed, and the engine and weights it
    audited unchanged since; a forged or stale audit is refused (exit 2), --force or not."""
    folder = engine_dir / "audit"
    if not folder.exists():
        return None
    audit = AuditFolder.open(folder)
    audit.result()  # audit.json readable and agreeing with its manifest
    return audit


def pick_engine_backend(engine_dir: Path, engine_backend: str | None, audit: AuditFolder | None) -> str:
    """The engine backend asked for, else the audited one, else the only one present."""
    if engine_backend is not None:
        return engine_backend_present(engine_dir, engine_backend)
    present = [b for b in engine_backends(engine_dir) if b in BACKENDS]
    audited = None if audit is None else audit.manifest.get("backend")
    if audited in present:
        return audited
    if len(present) == 1:
        return present[0]
    if not present:
        raise MpdeployError(f"{engine_dir} holds no engine-<backend>/ folder; run mpdeploy build first")
    raise MpdeployError(
        f"{engine_dir} holds several engines ({', '.join(present)}) and no audit names one; "
        f"pick one with --engine-backend"
    )


def audit_of_engine(audit: AuditFolder | None, engine: EngineFolder, engine_dir: Path) -> str | None:
    """Refuse an audit that cannot be tied to `engine` (integrity: --force never overrides this); return
    the problem with it that --force may override (none, another backend's audit), or None when it is this
    engine's audit.

    Tied means: the audit records an engine source, that source is this very folder, and the manifest hash
    it recorded is this engine manifest's hash (so any later edit of the engine or its manifest shows)."""
    if audit is None:
        return f"{engine_dir} has no audit/{AuditFolder.RESULT}"
    where = audit.path
    record = audit.sources.get("engine")
    if not isinstance(record, dict) or not record.get("path") or not record.get("manifest_sha256"):
        raise MpdeployError(
            f"{where} records no engine it audited (sources stripped, or made by an older mpdeploy): nothing ties it "
            f"to {engine.path}; run mpdeploy audit {engine_dir} again"
        )
    audited = Path(audit.path, record["path"]).resolve()
    if audited != Path(engine.path).resolve():
        if audited.parent == Path(engine_dir).resolve() and audited.name.startswith("engine-"):
            return f"the audit in {engine_dir} is for {audited.name}, not {Path(engine.path).name}"
        raise MpdeployError(
            f"{where} audited another engine ({audited}), not {engine.path}; run mpdeploy audit {engine_dir} "
            "on this engine"
        )
    engine_hash = artifacts.manifest_hash(engine.path)
    recorded = {record["manifest_sha256"], (audit.manifest.get("inputs") or {}).get("engine_manifest", engine_hash)}
    backends = {audit.manifest.get("backend"), audit.result().get("backend")}
    if recorded != {engine_hash} or backends != {engine.backend}:
        raise MpdeployError(
            f"{where} was made for another version of {engine.path} (engine manifest hash or backend differs); "
            f"run mpdeploy audit {engine_dir} again"
        )
    return None


def check_verdict(audit: AuditFolder | None, problem: str | None, engine_dir: Path, force: bool) -> None:
    """Refuse an engine without a passed audit of its own; with `force`, only warn."""
    if problem is None and audit is not None and audit.result().get("passed") is not True:
        failures = "; ".join(str(f) for f in audit.result().get("failures") or []) or "no reason given"
        problem = f"the audit of {engine_dir} failed ({failures})"
    if problem is None:
        return
    if not force:
        raise MpdeployError(f"{problem}; run mpdeploy audit and fix the engine, or pass --force to ship it anyway")
    logger.warning("%s; shipping anyway because of --force", problem)


def open_engine(engine_dir: Path, backend: str) -> EngineFolder:
    """The engine folder, verified like every artifact (files, self-hash, its sources): --force or not."""
    engine = EngineFolder.open(engine_dir / engine_folder_name(backend))
    read_engine_manifest(engine_dir, backend)
    onnx = engine.onnx()
    if onnx is not None:  # Triton's config takes its names and shapes from `io`
        check_recorded_io(engine.path / artifacts.MANIFEST, engine.manifest.get("io"), onnx.sparse_model)
    return engine


def read_engine_manifest(engine_dir: Path, backend: str) -> dict[str, Any]:
    path = engine_dir / engine_folder_name(backend) / artifacts.MANIFEST
    manifest = _read_json(path, "engine manifest")
    if manifest.get("schema") != EngineFolder.SCHEMA or manifest.get("kind") != "engine":
        raise MpdeployError(
            f"{path} is not an engine manifest (schema {manifest.get('schema')!r}, expected {EngineFolder.SCHEMA!r}); "
            f"rebuild with mpdeploy build"
        )
    if manifest.get("backend") != backend:
        raise MpdeployError(
            f"{path} says backend {manifest.get('backend')!r} but sits in {engine_folder_name(backend)}/; rebuild it"
        )
    io = manifest.get("io")
    if not isinstance(io, dict) or not io.get("inputs") or not io.get("outputs"):
        raise MpdeployError(f"{path} has no io.inputs/io.outputs; rebuild with mpdeploy build")
    return manifest


def engine_file(engine_dir: Path, backend: str, manifest: dict[str, Any], variant: str) -> Path:
    """The variant's engine file the manifest names: one the manifest's `files` table hashes (checked when
    the folder was opened), re-checked here against that hash."""
    files = manifest.get("variants") if isinstance(manifest.get("variants"), dict) else {}
    if variant not in files:
        have = ", ".join(sorted(map(str, files))) or "none"
        raise MpdeployError(f"{engine_folder_name(backend)} has no {variant} engine (has: {have}); pass --variant "
                            "with one of those")
    rel = files[variant]
    path = engine_dir / engine_folder_name(backend) / str(rel)
    expected = (manifest.get("files") or {}).get(rel) if isinstance(rel, str) else None
    if expected is None or Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
        raise MpdeployError(f"engine file {path} named by the manifest is missing or not hashed in it; "
                            "rebuild with mpdeploy build")
    recorded = (manifest.get("file_sha256") or {}).get(rel)
    if recorded is None:  # the engine stage always records it: without it, nothing says what was built
        raise MpdeployError(f"engine file {path} has no sha256 recorded with the engine (file_sha256; made by an "
                            "older mpdeploy, or edited); rebuild with mpdeploy build")
    if sha256_file(path) != expected or recorded != expected:
        raise MpdeployError(f"{path} does not match the sha256 in its manifest (changed since the build); rebuild it")
    return path

"""What `mpdeploy ship` reads from an engine directory, verified before the repository is touched.

Which `engine-<backend>/` to ship, its manifest and engine file (hash-checked), and the audit that
must have passed for it (unless --force).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mpdeploy.artifacts import sha256_file
from mpdeploy.errors import MpdeployError

# Its warnings are ship's: the CLI prints the logger name on every line.
logger = logging.getLogger("mpdeploy.ship")

ENGINE_SCHEMA = "mpdeploy.engine/1"
ENGINE_BACKENDS = ("trt", "torch", "ort")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MpdeployError(f"cannot read {what} {path}: {exc}; rebuild it") from exc
    if not isinstance(data, dict):
        raise MpdeployError(f"{what} {path} is not a JSON object; rebuild it")
    return data


def read_audit(engine_dir: Path) -> dict[str, Any] | None:
    """The audit, opened through its verified artifact: every file hashed, and the engine and weights it
    audited unchanged since; a forged or stale audit is refused (exit 2), --force or not."""
    from mpdeploy.kinds import AuditFolder

    folder = engine_dir / "audit"
    if not folder.exists():
        return None
    return AuditFolder.open(folder).result()


def pick_engine_backend(engine_dir: Path, engine_backend: str | None, audit: dict[str, Any] | None) -> str:
    """The engine backend asked for, else the audited one, else the only one present."""
    present = sorted(b for b in ENGINE_BACKENDS if (engine_dir / f"engine-{b}").is_dir())
    if engine_backend is not None:
        if engine_backend not in ENGINE_BACKENDS:
            raise MpdeployError(
                f"engine backend {engine_backend!r} unknown; use one of {', '.join(ENGINE_BACKENDS)}"
            )
        if engine_backend not in present:
            raise MpdeployError(
                f"{engine_dir} has no engine-{engine_backend}/ (present: {', '.join(present) or 'none'}); "
                f"build it or pick another engine backend"
            )
        return engine_backend
    if audit is not None and audit.get("backend") in present:
        return audit["backend"]
    if len(present) == 1:
        return present[0]
    if not present:
        raise MpdeployError(f"{engine_dir} holds no engine-<backend>/ folder; run mpdeploy build first")
    raise MpdeployError(
        f"{engine_dir} holds several engines ({', '.join(present)}) and no audit names one; "
        f"pick one with --engine-backend"
    )


def check_audit(audit: dict[str, Any] | None, backend: str, engine_dir: Path, force: bool) -> None:
    """Refuse an engine without a passed audit of this backend; with `force`, only warn."""
    if audit is None:
        problem = f"{engine_dir} has no audit/audit.json"
    elif audit.get("backend") != backend:
        problem = f"the audit in {engine_dir} is for engine-{audit.get('backend')}, not engine-{backend}"
    elif audit.get("passed") is not True:
        failures = "; ".join(str(f) for f in audit.get("failures") or []) or "no reason given"
        problem = f"the audit of {engine_dir} failed ({failures})"
    else:
        return
    if not force:
        raise MpdeployError(f"{problem}; run mpdeploy audit and fix the engine, or pass --force to ship it anyway")
    logger.warning("%s; shipping anyway because of --force", problem)


def read_engine_manifest(engine_dir: Path, backend: str) -> dict[str, Any]:
    path = engine_dir / f"engine-{backend}" / "manifest.json"
    manifest = _read_json(path, "engine manifest")
    if manifest.get("schema") != ENGINE_SCHEMA or manifest.get("kind") != "engine":
        raise MpdeployError(
            f"{path} is not an engine manifest (schema {manifest.get('schema')!r}, expected {ENGINE_SCHEMA!r}); "
            f"rebuild with mpdeploy build"
        )
    if manifest.get("backend") != backend:
        raise MpdeployError(
            f"{path} says backend {manifest.get('backend')!r} but sits in engine-{backend}/; rebuild it"
        )
    io = manifest.get("io")
    if not isinstance(io, dict) or not io.get("inputs") or not io.get("outputs"):
        raise MpdeployError(f"{path} has no io.inputs/io.outputs; rebuild with mpdeploy build")
    return manifest


def engine_file(engine_dir: Path, backend: str, manifest: dict[str, Any], variant: str) -> Path:
    """The variant's engine file the manifest names, checked against the manifest's sha256."""
    files = manifest.get("variants") or {}
    if variant not in files:
        have = ", ".join(sorted(files)) or "none"
        raise MpdeployError(f"engine-{backend} has no {variant} engine (has: {have}); pass --variant with one of those")
    rel = files[variant]
    path = engine_dir / f"engine-{backend}" / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
        raise MpdeployError(f"engine file {path} named by the manifest is missing; rebuild with mpdeploy build")
    expected = (manifest.get("file_sha256") or {}).get(rel)
    if expected is not None and sha256_file(path) != expected:
        raise MpdeployError(f"{path} does not match the sha256 in its manifest (changed since the build); rebuild it")
    return path

"""Artifact folders: atomic creation, manifests, content hashes.

Every stage writes one folder with a `manifest.json`: schema, kind, the config that made it, the
hashes of its inputs and of its own files, tool versions. Folders are built under a temporary name
beside the target and renamed only when complete, so an interrupted stage never leaves a folder a
re-run would take as finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "tolist"):  # numpy scalars / arrays
        return obj.tolist()
    if hasattr(obj, "__str__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj)!r}")


def to_jsonable(obj: Any) -> Any:
    """Round-trip through JSON so configs with Paths / dataclasses / patterns become plain data."""
    return json.loads(json.dumps(obj, default=_json_default))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MpdeployError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpdeployError(f"{what} {path} is not valid JSON ({exc}); re-create it") from None


def _check_parent_writable(target: Path) -> None:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MpdeployError(f"cannot create {target}: {parent} is a file; choose another --out") from None
    except PermissionError:
        raise MpdeployError(f"cannot create {target}: no permission to write in {parent}; choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise MpdeployError(f"cannot write to {parent}; choose another --out or fix its permissions")
    if target.exists() and not target.is_dir():
        raise MpdeployError(f"output path {target} exists and is a file; remove it or choose another --out")


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that becomes `target` only if the block finishes.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and `target` is
    left as it was. An existing `target` is replaced only after success.
    """
    target = Path(target)
    _check_parent_writable(target)
    if target.exists() and not overwrite:
        raise MpdeployError(f"{target} already exists; remove it or pass --force")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tool_versions() -> dict[str, str]:
    """Versions of what shaped an artifact; imports only what is already loaded or cheap."""
    from mpdeploy import __version__

    versions = {"mpdeploy": __version__, "python": platform.python_version()}
    for name in ("torch", "timm", "onnx", "onnxruntime", "numpy", "tensorrt", "polygraphy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed: leave it out
            continue
    return versions


def write_manifest(
    folder: Path,
    kind: str,
    config: Any,
    inputs: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` into `folder`, hashing every file already in it."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "schema": f"mpdeploy.{kind}/{SCHEMA_VERSION}",
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        "config": to_jsonable(config),
        "config_hash": sha256_json(to_jsonable(config)),
        "inputs": dict(inputs or {}),
        "files": files,
    }
    clash = sorted(set(manifest) & set(extra or {}))
    if clash:  # a stage overwriting e.g. `files` would silently disable hash verification
        raise ValueError(f"manifest extra keys {clash} are reserved by write_manifest")
    manifest.update(to_jsonable(dict(extra or {})))
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, kind: str, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest: right kind, schema, and (optionally) file hashes."""
    folder = Path(folder)
    if not folder.exists():
        raise MpdeployError(f"artifact folder not found: {folder}; run the stage that makes it first")
    if not folder.is_dir():
        raise MpdeployError(f"{folder} is not an artifact folder (it is a file)")
    manifest = read_json(folder / MANIFEST, what=f"{kind} manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise MpdeployError(f"{folder} is a '{found}' artifact, expected '{kind}'; pass the right folder")
    expected_schema = f"mpdeploy.{kind}/{SCHEMA_VERSION}"
    if manifest.get("schema") != expected_schema:
        raise MpdeployError(
            f"{folder}: schema {manifest.get('schema')!r} is not {expected_schema!r}; re-create it with this mpdeploy"
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    for rel, digest in manifest.get("files", {}).items():
        path = Path(folder) / rel
        if not path.is_file():
            raise MpdeployError(f"{folder}: {rel} is missing; re-create the artifact")
        if sha256_file(path) != digest:
            raise MpdeployError(
                f"{folder}: {rel} does not match the hash in its manifest (modified or corrupt); re-create the artifact"
            )


def manifest_hash(folder: Path) -> str:
    return sha256_file(Path(folder) / MANIFEST)


def is_complete(folder: Path, kind: str, config_hash: str, inputs: Mapping[str, str]) -> bool:
    """True if `folder` is a finished artifact made from the same config and inputs (stage reuse)."""
    try:
        manifest = read_manifest(folder, kind, verify=True)
    except MpdeployError:
        return False
    return manifest.get("config_hash") == config_hash and manifest.get("inputs") == dict(inputs)

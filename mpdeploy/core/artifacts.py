"""Artifact folders: atomic creation, manifests, content hashes.

Every stage writes one folder with a `manifest.json`: schema, kind, the config that made it, the
hashes of its inputs and of its own files, tool versions. Folders are built under a temporary name
beside the target and renamed only when complete, so an interrupted stage never leaves a folder a
re-run would take as finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mpdeploy.core.atomic import (
    check_target,
    clean_stale_temps,
    json_default,
    normal_modes,
    read_json,
    swap_into_place,
    translate_os_errors,
    write_json,
)
from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


_HASH_CACHE: dict[tuple, str] = {}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash; cached per (inode, size, mtime_ns) so following a chain does not re-read big weights."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if len(_HASH_CACHE) > 4096:
        _HASH_CACHE.clear()
    _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Round-trip through JSON so configs with Paths / dataclasses / patterns become plain data."""
    return json.loads(json.dumps(obj, default=json_default))


def check_replaceable(target: Path, kind: str | None = None) -> None:
    """Refuse to replace `target` unless it is missing, empty, or an mpdeploy artifact (of `kind`).

    An --out that names a user's folder must never be deleted: only what mpdeploy wrote is replaced."""
    target = Path(target)
    if not target.is_dir() or not any(target.iterdir()):
        return
    manifest_path = target / MANIFEST
    found = None
    if manifest_path.is_file():
        try:
            data = json.loads(manifest_path.read_text())
            found = data.get("kind") if isinstance(data, dict) and str(data.get("schema", "")).startswith("mpdeploy.") else None
        except (OSError, ValueError):
            found = None
    if found is None:
        raise MpdeployError(f"{target} exists and is not an mpdeploy artifact; refusing to replace it "
                            "(nothing was deleted): choose a new or empty --out")
    if kind is not None and found not in _family(kind):
        raise MpdeployError(f"{target} holds a '{found}' artifact, not '{kind}'; refusing to replace it "
                            "(nothing was deleted): choose another --out")


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = True, kind: str | None = None,
               replace_any: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `target` only if the block finishes.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and `target` is
    left as it was. An existing `target` is replaced only after success, and only if it is empty or an
    mpdeploy artifact (of `kind` when given; `replace_any` for private folders such as checkpoints).
    Temporaries of killed earlier runs beside `target` are removed first; a full disk or an over-long
    name becomes a one-line MpdeployError.
    """
    target = Path(target)
    check_target(target)
    if target.exists() and not overwrite:
        raise MpdeployError(f"{target} already exists; remove it or pass --force")
    if not replace_any:
        check_replaceable(target, kind)
    clean_stale_temps(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with translate_os_errors(target):
            tmp.mkdir()
            yield tmp
            normal_modes(tmp)
            swap_into_place(tmp, target)
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


# Kinds a consumer of `kind` accepts: a distilled artifact is a pruned one with recovered weights.
KIND_FAMILY: dict[str, tuple[str, ...]] = {"pruned": ("pruned", "distilled")}


def _family(kind: str) -> tuple[str, ...]:
    return KIND_FAMILY.get(kind, (kind,))


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def source_record(folder: Path, source: Path) -> dict[str, str]:
    """How an artifact written to `folder` names its input `source`: a path relative to `folder` and
    the hash of the source's manifest (which hashes every file of it)."""
    return {"path": _relative(source, folder), "manifest_sha256": manifest_hash(source)}


def write_manifest(
    folder: Path,
    kind: str,
    config: Any,
    inputs: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    sources: Mapping[str, Path] | None = None,
    target: Path | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` into `folder`, hashing every file already in it.

    `sources` maps a role ("weights", "onnx", "engine", ...) to the input artifact folder; each is
    recorded relative to `target` (where `folder`, a temporary, will be renamed to) with its manifest
    hash, so a reader can follow the chain and refuse a source that changed (and the reuse rule can
    compare them). The manifest also carries the hash of its own content (`self_sha256`)."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
    where = _final_location(folder, target)
    recorded = {role: source_record(where, Path(src)) for role, src in (sources or {}).items()}
    manifest = {
        "schema": f"mpdeploy.{kind}/{SCHEMA_VERSION}",
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "inputs": dict(inputs or {}),
        "sources": recorded,
        "files": files,
    }
    clash = sorted(set(manifest) & set(extra or {}))
    if clash:  # a stage overwriting e.g. `files` would silently disable hash verification
        raise ValueError(f"manifest extra keys {clash} are reserved by write_manifest")
    manifest.update(to_jsonable(dict(extra or {})))
    manifest[SELF_HASH] = _self_hash(manifest)
    write_json(folder / MANIFEST, manifest)
    return manifest


SELF_HASH = "self_sha256"  # hash of the manifest's own content: an edited manifest.json is caught


def _self_hash(manifest: Mapping[str, Any]) -> str:
    return sha256_json({k: v for k, v in manifest.items() if k != SELF_HASH})


def _final_location(folder: Path, target: Path | None) -> Path:
    """The folder an atomic_dir temporary `.NAME.tmp-PID-XXXX` becomes (sources are relative to it)."""
    if target is not None:
        return Path(target)
    match = re.match(r"\.(.+)\.tmp-\d+-[0-9a-f]+$", folder.name)
    return folder.with_name(match.group(1)) if match else folder


def config_hash(config: Any) -> str:
    return sha256_json(to_jsonable(config))


def read_manifest(folder: Path, kind: str, verify: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest: right kind, schema, and (with `verify`) every file's hash,
    no unlisted file, and every recorded source unchanged (the whole chain, recursively)."""
    folder = Path(folder)
    if not folder.exists():
        raise MpdeployError(f"artifact folder not found: {folder}; run the stage that makes it first")
    if not folder.is_dir():
        raise MpdeployError(f"{folder} is not an artifact folder (it is a file)")
    manifest = read_json(folder / MANIFEST, what=f"{kind} manifest")
    accepted = _family(kind)
    if not isinstance(manifest, dict) or manifest.get("kind") not in accepted:
        found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise MpdeployError(f"{folder} is a '{found}' artifact, expected '{kind}'; pass the right folder")
    expected_schema = f"mpdeploy.{manifest['kind']}/{SCHEMA_VERSION}"
    if manifest.get("schema") != expected_schema:
        raise MpdeployError(
            f"{folder}: schema {manifest.get('schema')!r} is not {expected_schema!r}; re-create it with this mpdeploy"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("sources", {}), dict):
        raise MpdeployError(f"{folder}/manifest.json is damaged (no files table); re-create the artifact")
    if verify:
        verify_files(folder, manifest)  # first: a changed file is named, whatever else was edited
        verify_self(folder, manifest)
        verify_sources(folder, manifest)
    return manifest


def verify_self(folder: Path, manifest: Mapping[str, Any]) -> None:
    """An edited manifest.json (a field changed by hand) no longer matches its own hash. A manifest
    without one is refused too: accepting it would let an edit pass by deleting the hash."""
    if SELF_HASH not in manifest:
        raise MpdeployError(f"{folder}/manifest.json carries no content hash (written by an older mpdeploy, or "
                            "edited); re-create the artifact")
    if manifest[SELF_HASH] != _self_hash(manifest):
        raise MpdeployError(f"{folder}/manifest.json was edited after it was written (its content hash does not "
                            "match); re-create the artifact")


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every listed file present with its hash, and no file the manifest does not list."""
    folder = Path(folder)
    listed = manifest.get("files") or {}
    for rel, digest in listed.items():
        path = folder / rel
        if not path.is_file():
            raise MpdeployError(f"{folder}: {rel} is missing; re-create the artifact")
        if sha256_file(path) != digest:
            raise MpdeployError(
                f"{folder}: {rel} does not match the hash in its manifest (modified or corrupt); re-create the artifact"
            )
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if (path.is_file() or path.is_symlink()) and rel != MANIFEST and rel not in listed:
            raise MpdeployError(f"{folder}: {rel} is not listed in its manifest (added or renamed); "
                                "remove it or re-create the artifact")


def verify_sources(folder: Path, manifest: Mapping[str, Any], _seen: frozenset[Path] = frozenset()) -> None:
    """Follow `sources`: each must exist, have the recorded manifest hash, and verify in turn."""
    here = Path(folder).resolve()
    if here in _seen:
        raise MpdeployError(f"{folder}: its sources form a loop; re-create the artifacts")
    for role, rec in (manifest.get("sources") or {}).items():
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            raise MpdeployError(f"{folder}/manifest.json: source {role!r} is damaged; re-create the artifact")
        src = Path(folder) / rec["path"]
        if not (src / MANIFEST).is_file():
            raise MpdeployError(f"{folder}: its {role} source {src} is missing; keep the artifacts of one chain "
                                "together or re-run the stages")
        if manifest_hash(src) != rec.get("manifest_sha256"):
            raise MpdeployError(f"{folder}: its {role} source {src} changed after it was made from it; "
                                "re-run the stages from there")
        src_manifest = read_json(src / MANIFEST, what=f"{role} manifest")
        verify_files(src, src_manifest)
        verify_self(src, src_manifest)
        verify_sources(src, src_manifest, _seen | {here})


def manifest_hash(folder: Path) -> str:
    return sha256_file(Path(folder) / MANIFEST)


def is_complete(folder: Path, kind: str, config_hash: str, inputs: Mapping[str, str],
                sources: Mapping[str, Path] | None = None) -> bool:
    """THE reuse rule: `folder` is a verified artifact (files, no extras, sources) of `kind` made from the
    same config hash, the same input hashes (model content, device, ...) and the same `sources`."""
    try:
        manifest = read_manifest(folder, kind, verify=True)
    except MpdeployError:
        return False
    if manifest.get("kind") != kind:
        return False
    recorded = manifest.get("sources") or {}
    if set(recorded) != set(sources or {}):
        return False
    for role, src in (sources or {}).items():  # the same folders, unchanged
        here = (Path(folder) / recorded[role]["path"]).resolve()
        if here != Path(src).resolve() or recorded[role].get("manifest_sha256") != manifest_hash(src):
            return False
    return manifest.get("config_hash") == config_hash and manifest.get("inputs") == dict(inputs)

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
import errno
import glob
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

from mpdeploy.errors import MpdeployError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_modes(root: Path) -> None:
    """Give `root` and everything in it the usual modes (0644 / 0755 under umask 022).

    Writers that use mkstemp-style temporaries (safetensors) leave files at 0600, unreadable by the
    other users of a shared engine or model repository."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library (safetensors) wraps it in its own exception."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def os_error_message(exc: OSError, path: Path | str) -> str | None:
    """One line for the OSErrors a hostile --out / full disk gives, or None for other errors."""
    if disk_full(exc):
        return f"disk full while writing {path}; free space there or choose another --out (nothing was kept)"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return f"path too long: {str(path)[:80]}...; choose a shorter --out (each name under 255 bytes)"
    return None


def _translate_os_errors(path: Path):
    """Context manager turning disk-full / name-too-long errors into one-line MpdeployErrors."""
    @contextlib.contextmanager
    def wrapper():
        try:
            yield
        except MpdeployError:
            raise
        except Exception as exc:
            message = os_error_message(exc, path) if isinstance(exc, OSError) or disk_full(exc) else None
            if message is None:
                raise
            raise MpdeployError(message) from None

    return wrapper()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _translate_os_errors(path):
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


def _check_target(target: Path) -> None:
    if target.name in ("", ".", ".."):
        raise MpdeployError(f"output path {str(target)!r} names no folder; pass a new folder name, e.g. --out engines/x")
    parent = target.parent
    try:
        with _translate_os_errors(target):
            parent.mkdir(parents=True, exist_ok=True)
            target.exists()
    except (FileExistsError, NotADirectoryError):
        raise MpdeployError(f"cannot create {target}: {parent} is a file; choose another --out") from None
    except PermissionError:
        raise MpdeployError(f"cannot create {target}: no permission to write in {parent}; choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise MpdeployError(f"cannot write to {parent}; choose another --out or fix its permissions")
    if target.exists() and not target.is_dir():
        raise MpdeployError(f"output path {target} exists and is a file; remove it or choose another --out")


_check_parent_writable = _check_target  # old name


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_TEMP_RE = r"\.{name}\.(?:tmp|old)-(\d+)-"


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>-*` (and `.old-<pid>-*`) beside `target` whose process no longer runs (kill -9).

    Temporaries of a live process (a concurrent run) are left alone."""
    target = Path(target)
    removed: list[Path] = []
    if not target.name or not target.parent.is_dir():
        return removed
    pattern = re.compile(_TEMP_RE.format(name=re.escape(target.name)))
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        match = pattern.match(tmp.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        logger.info("removed %d unfinished %s temporar%s from an interrupted run", len(removed), target.name,
                    "y" if len(removed) == 1 else "ies")
    return removed


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
    _check_target(target)
    if target.exists() and not overwrite:
        raise MpdeployError(f"{target} already exists; remove it or pass --force")
    if not replace_any:
        check_replaceable(target, kind)
    clean_stale_temps(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _translate_os_errors(target):
            tmp.mkdir()
            yield tmp
            _normal_modes(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
    hash, so a reader can follow the chain and refuse a source that changed. Their manifest hashes
    also enter `inputs` (the reuse key) as `<role>_manifest`."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
    where = _final_location(folder, target)
    recorded = {role: source_record(where, Path(src)) for role, src in (sources or {}).items()}
    all_inputs = dict(inputs or {})
    for role, rec in recorded.items():
        all_inputs.setdefault(f"{role}_manifest", rec["manifest_sha256"])
    manifest = {
        "schema": f"mpdeploy.{kind}/{SCHEMA_VERSION}",
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "inputs": all_inputs,
        "sources": recorded,
        "files": files,
    }
    clash = sorted(set(manifest) & set(extra or {}))
    if clash:  # a stage overwriting e.g. `files` would silently disable hash verification
        raise ValueError(f"manifest extra keys {clash} are reserved by write_manifest")
    manifest.update(to_jsonable(dict(extra or {})))
    write_json(folder / MANIFEST, manifest)
    return manifest


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
        verify_files(folder, manifest)
        verify_sources(folder, manifest)
    return manifest


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
        verify_sources(src, src_manifest, _seen | {here})


def manifest_hash(folder: Path) -> str:
    return sha256_file(Path(folder) / MANIFEST)


def is_complete(folder: Path, kind: str, config_hash: str, inputs: Mapping[str, str],
                sources: Mapping[str, Path] | None = None) -> bool:
    """THE reuse rule: `folder` is a verified artifact (files, no extras, sources) of `kind` made from the
    same config hash and the same input hashes (input manifests, model content, device)."""
    inputs = dict(inputs)
    for role, src in (sources or {}).items():
        if not (Path(src) / MANIFEST).is_file():
            return False
        inputs.setdefault(f"{role}_manifest", manifest_hash(src))
    try:
        manifest = read_manifest(folder, kind, verify=True)
    except MpdeployError:
        return False
    if manifest.get("kind") != kind:
        return False
    return manifest.get("config_hash") == config_hash and manifest.get("inputs") == dict(inputs)

"""Atomic files and folders on disk, and the OS errors a hostile --out or a full disk gives.

Below `artifacts` (manifests, hashes, kinds): writes go to a temporary name beside the target and are
renamed into place; temporaries of killed runs are removed by the next run; ENOSPC / ENAMETOOLONG
become one-line MpdeployErrors; files get the usual modes (0644 under umask 022).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import glob
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)


def json_default(obj: Any) -> Any:
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(root: Path) -> None:
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
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied: {exc.filename or path}; check that you may read it (an input) or write "
                "there (choose another --out)")
    return None


def translate_os_errors(path: Path):
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
        with translate_os_errors(path):
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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MpdeployError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MpdeployError(f"{what} {path} is not valid JSON ({exc}); re-create it") from None


def check_target(target: Path) -> None:
    if target.name in ("", ".", ".."):
        raise MpdeployError(f"output path {str(target)!r} names no folder; pass a new folder name, e.g. --out engines/x")
    parent = target.parent
    try:
        with translate_os_errors(target):
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


def swap_into_place(tmp: Path, target: Path, tries: int = 5) -> None:
    """Rename `tmp` to `target`, moving a finished `target` aside first. Two runs finishing at once (two
    builds into one --out) may each find the other's folder in place: the later one wins, neither fails."""
    for attempt in range(tries):
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(target, old)
            except FileNotFoundError:  # the other run moved it first
                old = None
        else:
            old = None
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == tries - 1:
                raise
            continue  # another run renamed its folder into place in between: move it aside and retry
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return



"""Triton's model repository: its file names, and writing into it without ever leaving half a model behind.

The file names below are Triton's layout (what its backends load by default), owned here; an mpdeploy
artifact's files are named by its kind (mpdeploy.core.kinds), even where a name is the same.

Temporary names are hidden, non-numeric (Triton skips them as versions) and carry the writer's pid, so a
later ship removes what a killed one left but keeps a running one's staging; renames never replace
anything; a failed write becomes one line that names the fix for its errno.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"  # <repo>/<model>/: one config per model, shared by its versions
# <repo>/<model>/<version>/: the file each serving platform (or Triton backend) loads by default
MODEL_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}
PROVENANCE_FILE = "provenance.json"  # what was shipped: audit summary, engine manifest, hashes
SUMS_FILE = "SHA256SUMS"  # `cd <version> && sha256sum -c SHA256SUMS`

# Temporary names: hidden and non-numeric (Triton skips them as versions; ".tmp-" is git-ignored), and
# carrying our pid, so a later ship can tell a killed ship's leftovers from a running ship's staging.
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def tmp_name_next_to(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmp(folder: Path) -> None:
    """Remove what ships killed midway (SIGKILL, power loss) left in `folder`: our temp names, dead pids."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _TMP_RE.match(path.name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        logger.info("removing %s, left by an interrupted ship", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:  # default mode: 0644 under the usual umask, like every other artifact
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class VersionTaken(Exception):
    """Another ship placed the same model folder or version first (a race, not a user error)."""


def rename_new(src: Path, dst: Path) -> None:
    # os.rename would silently replace an empty folder that appeared meanwhile; never replace anything.
    # A non-empty folder that appears between the check and the rename makes rename fail instead.
    if dst.exists():
        raise VersionTaken(dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VersionTaken(dst) from exc
        raise


_WRITE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (quota)",
    errno.EACCES: "make the repository writable for this user",
    errno.EPERM: "make the repository writable for this user",
    errno.EROFS: "pass a repository on a writable file system",
    errno.ENOTDIR: "part of the path is a file; pass a folder for --repo",
    errno.ENAMETOOLONG: "use a shorter --repo or --name",
}


def write_error(exc: OSError, repo: Path) -> MpdeployError:
    """One line for a failed write: what failed where, and the fix for that errno."""
    fix = _WRITE_FIXES.get(exc.errno, "check the repository path and the disk")
    where = "" if exc.filename in (None, str(repo)) else f": {short_path(exc.filename)}"
    return MpdeployError(
        f"cannot write the model repository {short_path(repo)} ({exc.strerror or exc}{where}); {fix} and run again "
        f"(nothing was changed)"
    )


def short_path(path: Any, keep: int = 100) -> str:
    """A path for a one-line message: newlines escaped, the middle of a very long one elided."""
    text = str(path).replace("\n", "\\n")
    return text if len(text) <= 2 * keep else f"{text[:keep]}...{text[-keep:]}"

"""Small helpers for fault-injection tests: run the CLI in a subprocess, check its one-line error, hash trees.

Self-contained on purpose (no fixtures, no mpdeploy imports), so any test module can use them:

    result = run_cli("ship", engine, "--repo", repo)
    assert_one_line_error(result, "No space left")
    assert tree_hash(repo) == before
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (so `python -m mpdeploy` runs this tree)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra or {})
    return env


def cli_command(*args, python_code: str | None = None) -> list[str]:
    """argv for `python -m mpdeploy ARGS`, or for `python -c CODE ARGS` (a wrapper that injects a fault)."""
    head = [sys.executable, "-c", python_code] if python_code else [sys.executable, "-m", "mpdeploy"]
    return [*head, *(str(a) for a in args)]


def run_cli(*args, python_code: str | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI to completion; stdout/stderr captured as text. kwargs go to subprocess.run."""
    kwargs.setdefault("env", cli_env())
    return subprocess.run(
        cli_command(*args, python_code=python_code), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one non-empty stderr line holding every fragment, no traceback; returns the line."""
    where = f"argv {result.args!r}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 2, f"exit code {result.returncode}, expected 2\n{where}"
    assert "Traceback" not in result.stderr + result.stdout, where
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} stderr lines, expected 1\n{where}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in the error line\n{where}"
    return lines[0]


def tree_hash(path: Path) -> dict[str, str]:
    """Relative path -> content sha256 ("dir" for folders, "link:<target>" for links), with file modes.

    Equal results mean nothing under `path` was added, removed, changed or re-permissioned.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    entries = [path] if path.is_file() else sorted(path.rglob("*"))
    out = {}
    for p in entries:
        rel = "." if p == path else str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = f"dir {oct(p.stat().st_mode & 0o7777)}"
        else:
            out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode & 0o7777)}"
    return out


class Payload:
    """Unpickling this writes `marker`: what a hostile model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def run_in_process(capfd, args) -> tuple[int, list[str]]:
    """`mpdeploy -q ARGS` in this process: its exit code and its non-empty stderr lines."""
    from mpdeploy.cli import main as cli_main

    code = cli_main(["-q", *args])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    return code, err


def one_line(code, err, *needles) -> str:
    """Exit 2 and exactly one stderr line holding every needle, no traceback."""
    assert code == 2, err
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err
    return err[0]

"""Where a benchmark number came from: recorded in every results file under benchmarks/results/.

Every script in benchmarks/ opens a `Provenance` before it measures and stores `prov.finish()` under
the results' "provenance" key: the git commit and whether the tree differed from it, the date, the
machine (CPU model, cores), the load average before and after, library versions, and the sha256 of
each model measured (a zoo model: its shipped weights file; a timm random-init model: its state dict).

Peak memory is per run: `run_child` waits for its own child with os.wait4, whose rusage covers that
child alone (RUSAGE_CHILDREN would be the running maximum over every child so far).

This is benchmark code, not library code: it imports nothing from mpdeploy at module level.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mpdeploy.core.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "mpdeploy.benchmark-provenance/1"
# The distributions whose version can change a number; ones not installed are recorded as None.
DEFAULT_PACKAGES = ("torch", "onnxruntime", "timm", "onnx", "polygraphy")
MODELOPT = "nvidia-modelopt"


# What the benchmarks themselves write: results and the figure rendered from them. A tree that differs from
# its commit only there (a benchmark run after another in the same checkout) measured the commit's code.
OUTPUT_PATHS = ("benchmarks/results/", "docs/sweep_frontier.png")


def code_changed(git: dict) -> bool:
    """Did the measured tree differ from its commit in anything but benchmark outputs? (a recorded git state)"""
    if not git.get("dirty"):
        return False
    changed = git.get("changed_files")
    if not changed or len(changed) >= 50:  # not recorded, or cut at 50: assume code
        return True
    return any(not name.startswith(OUTPUT_PATHS) for name in changed)


def git_state(repo: Path = REPO) -> dict:
    """Commit of HEAD and the tracked files that differ from it (a dirty tree measures other code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout.rstrip("\n")

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "why": "not a git checkout"}
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed[:50]}


def machine() -> dict:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor, in name order.

    The same weights give the same hash on any machine; used for models that have no file (timm
    random init from a fixed seed, models trained inside a benchmark)."""
    import torch

    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def zoo_sha256(name: str) -> dict:
    """The shipped weights file of zoo model `name` and its sha256 (the zoo's registry records it)."""
    from mpdeploy.models import zoo

    path = _zoo_weights_file(zoo, name)
    if path is None or not path.is_file():
        return {"sha256": None, "why": f"no weights file found for zoo model {name}"}
    return {"sha256": file_sha256(path), "file": _relative(path), "how": "sha256 of the shipped weights file"}


def _zoo_weights_file(zoo, name: str) -> Path | None:
    for attr in ("zoo_weights_path", "weights_path", "shipped_weights"):
        fn = getattr(zoo, attr, None)
        if callable(fn):
            return Path(fn(name))
    cached = zoo.zoo_root() / name / "model.safetensors"
    return cached if cached.is_file() else None


def build_model_sha256(build_dir: Path) -> dict:
    """The model an `mpdeploy build` measured: the sha256 of the dense weights its prune stage recorded
    (pruned/dense.safetensors, the model as loaded, before pruning)."""
    dense = Path(build_dir) / "pruned" / "dense.safetensors"
    if not dense.is_file():
        return {"sha256": None, "why": f"no {dense.name} in {Path(build_dir).name}/pruned"}
    return {"sha256": file_sha256(dense), "how": "sha256 of pruned/dense.safetensors (the dense model as loaded)"}


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass
class Provenance:
    """Opened before a benchmark measures anything, finished just before its results are written."""

    script: str
    argv: list[str]
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    started: float = field(default_factory=time.time)
    load_before: list[float] = field(default_factory=loadavg)
    models: dict[str, dict] = field(default_factory=dict)
    git: dict = field(default_factory=git_state)  # at the start: the code that ran

    def model(self, label: str, sha256: str | dict | None, how: str | None = None) -> None:
        """Record the sha256 of a model this run measured (a dict from zoo_sha256, or a hex string)."""
        record = dict(sha256) if isinstance(sha256, dict) else {"sha256": sha256}
        if how:
            record["how"] = how
        self.models[label] = record

    def zoo(self, name: str) -> None:
        self.model(f"zoo:{name}", zoo_sha256(name))

    def module(self, label: str, module, how: str = "sha256 of the state dict (no weights file)") -> None:
        self.model(label, state_dict_sha256(module), how)

    def finish(self) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "schema": SCHEMA, "script": self.script, "argv": self.argv,
            "git": self.git, "date": now.isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "machine": machine(), "loadavg_before": self.load_before, "loadavg_after": loadavg(),
            "versions": versions(self.packages), "models": self.models,
            **({"git_at_end": end} if (end := git_state()) != self.git else {}),  # a commit landed mid-run
        }


def begin(script_file: str, argv: list[str] | None = None, modelopt: bool = False) -> Provenance:
    packages = DEFAULT_PACKAGES + ((MODELOPT,) if modelopt else ())
    return Provenance(script=_relative(Path(script_file)), argv=list(sys.argv[1:] if argv is None else argv),
                      packages=packages)


def write_results(path: Path, results: dict, prov: Provenance) -> dict:
    """Write results with their provenance (first key), through a temporary file."""
    record = {"provenance": prov.finish(), **{k: v for k, v in results.items() if k != "provenance"}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


@dataclass
class ChildRun:
    returncode: int | str
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float  # user + system of this child (and its waited-for descendants)
    peak_rss_mib: float  # this child's own peak (its largest waited-for descendant counts too)
    load_before: list[float]
    load_after: list[float]

    def record(self) -> dict:
        def num(v: float, digits: int) -> float | None:
            return None if v != v else round(v, digits)  # NaN (no rusage: the run timed out) -> null

        return {"returncode": self.returncode, "wall_s": num(self.wall_s, 2), "cpu_s": num(self.cpu_s, 2),
                "peak_rss_mib": num(self.peak_rss_mib, 1), "loadavg_before": self.load_before,
                "loadavg_after": self.load_after}


# A small launcher between the benchmark and its child: on Linux a child's ru_maxrss starts from the
# memory of the process it was forked from (exec keeps the larger of the two), so a child forked straight
# from a benchmark that has torch loaded would report the benchmark's size. Forked from this ~10 MiB
# launcher instead, the child's peak is its own; the launcher writes the child's rusage to a file.
_LAUNCHER = r"""
import json, os, shutil, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(shutil.which(argv[0]) or argv[0], argv, os.environ)
_, status, ru = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"status": status, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}, f)
"""


def run_child(argv: list[str], timeout_s: float | None = None, stdout=None, **popen) -> ChildRun:
    """Run argv and measure that one process: wall, CPU and peak RSS from os.wait4's rusage.

    stdout: None captures it (returned as text); a file object receives it (stderr follows it)."""
    import signal
    import tempfile

    load0, t0 = loadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        report = Path(tmp) / "rusage.json"
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(report), *argv],
                                    stdout=stdout if stdout is not None else out,
                                    stderr=subprocess.STDOUT if stdout is not None else err,
                                    start_new_session=True, **popen)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own session: it and the child
                proc.wait()
                timed_out = True
        wall = time.perf_counter() - t0
        usage = json.loads(report.read_text()) if report.is_file() else None
        returncode: int | str = "timeout" if timed_out or usage is None else os.waitstatus_to_exitcode(usage["status"])
        return ChildRun(returncode=returncode, stdout=out_path.read_text(errors="replace"),
                        stderr=err_path.read_text(errors="replace"), wall_s=wall,
                        cpu_s=usage["cpu_s"] if usage else float("nan"),
                        peak_rss_mib=usage["maxrss_kib"] / 1024.0 if usage else float("nan"),
                        load_before=load0, load_after=loadavg())


def self_peak_rss_mib() -> float:
    """Peak RSS of this process so far (for a script that is itself one run)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

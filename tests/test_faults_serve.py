"""Faults around `mpdeploy ship`, through the real CLI in a subprocess: full disk, read-only or misplaced
repositories, concurrent ships, SIGKILL midway. Each refusal: exit 2, one stderr line, no traceback, and
the repository exactly as before (tree hashes with file modes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from faults_helpers import assert_one_line_error, cli_command, cli_env, run_cli, tree_hash  # noqa: E402
from ship_engine import make_engine  # noqa: E402

from mpdeploy.serve.ship import ShipConfig, ship  # noqa: E402
from mpdeploy.serve.triton_config import parse_config  # noqa: E402

# Runs the CLI after replacing one function of mpdeploy.serve.ship (argv: FUNC MODE CLI-ARGS...).
_FAULT_WRAPPER = """
import errno, os, shutil, sys, time
import mpdeploy.serve.ship as ship
func, mode = sys.argv[1], sys.argv[2]
original = getattr(ship, func) if hasattr(ship, func) else getattr(shutil, func)
def patched(*args, **kwargs):
    if mode == "enospc":
        path = next((a for a in reversed(args) if isinstance(a, os.PathLike)), "?")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if mode == "hang":  # tell the test we are midway, then wait for SIGKILL
        print("MIDWAY", flush=True)
        time.sleep(600)
    if mode == "barrier":  # concurrent ships: nobody goes on before all have picked their version
        folder, n = os.environ["FAULT_BARRIER_DIR"], int(os.environ["FAULT_BARRIER_N"])
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < n and time.monotonic() < deadline:
            time.sleep(0.02)
    return original(*args, **kwargs)
if hasattr(ship, func):
    setattr(ship, func, patched)
else:
    setattr(shutil, func, patched)
from mpdeploy.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return make_engine(tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture
def shipped(engine, tmp_path) -> Path:
    """A repository holding tiny/1."""
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))
    return repo


def _visible(tree: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tree.items() if not any(part.startswith(".") for part in Path(k).parts)}


def _leftovers(repo: Path) -> list[Path]:
    return [p for p in repo.rglob("*") if ".tmp-" in p.name]


def _assert_versions_intact(repo: Path, versions: list[int]) -> None:
    model = repo / "tiny"
    assert sorted(int(p.name) for p in model.iterdir() if p.name.isdigit()) == versions
    assert parse_config((model / "config.pbtxt").read_text()).name == "tiny"
    for v in versions:
        sums = (model / str(v) / "SHA256SUMS").read_text().splitlines()
        assert len(sums) == 2  # model.onnx + provenance.json
        for line in sums:
            digest, name = line.split("  ")
            assert tree_hash(model / str(v) / name)["."].split()[0] == digest
    assert not _leftovers(repo)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` to ENOSPC, then free `leave` bytes again."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk)
    os.truncate(ballast, max(0, ballast.stat().st_size - leave))
    assert os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize <= leave + 4096


# ---------------------------------------------------------------------------------------------------


def test_full_disk_on_a_real_tmpfs(engine, tmp_path):
    with _tmpfs(tmp_path / "small", "12m") as disk:
        repo = disk / "repo"
        assert run_cli("ship", engine, "--repo", repo).returncode == 0
        cases = [  # nothing free (a new model; the next version), two pages free (its first files fit)
            (0, [["--repo", disk / "new" / "repo"], ["--repo", repo]]),
            (8192, [["--repo", repo]]),
        ]
        for leave, arg_sets in cases:
            _fill(disk, leave)
            before = tree_hash(disk / "repo")
            for args in arg_sets:
                result = run_cli("ship", engine, *args)
                assert_one_line_error(result, "No space left on device", "nothing was changed")
                assert tree_hash(disk / "repo") == before
                assert not (disk / "new").exists()
            (disk / "ballast").unlink()
        assert run_cli("ship", engine, "--repo", repo).returncode == 0  # space again: version 2
        _assert_versions_intact(repo, [1, 2])


@pytest.mark.parametrize(
    "func, extra",
    [("copyfile", ["--name", "fresh"]), ("write_text", []), ("rename_new", ["--version", "5"])],
    ids=["copy-new-model", "write-next-version", "rename-version-5"],
)
def test_full_disk_injected(shipped, engine, func, extra):
    before = tree_hash(shipped)
    result = run_cli(func, "enospc", "ship", engine, "--repo", shipped, *extra, python_code=_FAULT_WRAPPER)
    assert_one_line_error(result, "No space left on device", "free disk space", "nothing was changed")
    assert tree_hash(shipped) == before


def test_read_only_repository(shipped, engine, tmp_path):
    before = tree_hash(shipped)
    if os.geteuid() == 0:  # root ignores permission bits: make the file system itself read-only
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "--bind", "-o", "ro", str(shipped), str(ro)], capture_output=True).returncode:
            pytest.skip("cannot bind-mount read-only here")
        try:
            ro_tree = tree_hash(ro)
            for args in (["--repo", ro], ["--repo", ro / "new"]):
                assert_one_line_error(run_cli("ship", engine, *args), "Read-only file system", "writable file system")
                assert tree_hash(ro) == ro_tree
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)
    else:
        os.chmod(shipped, 0o555)
        try:
            result = run_cli("ship", engine, "--repo", shipped, "--name", "t2")
            assert_one_line_error(result, "Permission denied", "writable")
        finally:
            os.chmod(shipped, 0o755)
    assert tree_hash(shipped) == before


def test_repository_path_is_a_file(engine, tmp_path):
    target = tmp_path / "repo"
    target.write_text("not a folder")  # `--repo FILE` itself: tests/test_ship.py::test_cli
    assert_one_line_error(run_cli("ship", engine, "--repo", target / "sub"), "Not a directory", "part of the path is a file")
    model_file_repo = tmp_path / "repo2"
    model_file_repo.mkdir()
    (model_file_repo / "tiny").write_text("a file where the model folder goes")
    before = tree_hash(tmp_path)
    assert_one_line_error(run_cli("ship", engine, "--repo", model_file_repo), "is a file")
    assert tree_hash(tmp_path) == before


def _start_together(engine: Path, repo: Path, barrier: Path, n: int) -> list[subprocess.Popen]:
    barrier.mkdir()
    env = cli_env({"FAULT_BARRIER_DIR": str(barrier), "FAULT_BARRIER_N": str(n)})
    argv = cli_command("_fill_version_dir", "barrier", "ship", engine, "--repo", repo, python_code=_FAULT_WRAPPER)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return [subprocess.Popen(argv, env=env, **pipes) for _ in range(n)]


def test_four_concurrent_ships_each_get_a_version(engine, tmp_path):
    repo = tmp_path / "repo"
    # All four pick version 1 of a new model and stage it before any places it (a barrier in the
    # staging step); the losers find the model placed and take versions 2, 3, 4.
    procs = _start_together(engine, repo, tmp_path / "barrier", 4)
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert all("Traceback" not in err for _, err in outs)
    assert sum(err.count("taken by a concurrent ship") for _, err in outs) >= 3  # the race did happen
    assert sorted(int(Path(out.strip().split(": verified ")[0]).name) for out, _ in outs) == [1, 2, 3, 4]
    _assert_versions_intact(repo, [1, 2, 3, 4])


def _kill_midway(engine: Path, repo: Path, func: str) -> None:
    argv = cli_command(func, "hang", "ship", engine, "--repo", repo, python_code=_FAULT_WRAPPER)
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDWAY", proc.stderr.read() if proc.poll() is not None else ""
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_midway_then_rerun(engine, tmp_path):
    repo = tmp_path / "repo"
    _kill_midway(engine, repo, "rename_new")  # the new model folder is staged, not yet placed
    assert not (repo / "tiny").exists() and _leftovers(repo)
    result = run_cli("ship", engine, "--repo", repo)
    assert result.returncode == 0, result.stderr
    _assert_versions_intact(repo, [1])  # and the killed ship's staging folder is gone

    before = tree_hash(repo)
    _kill_midway(engine, repo, "rename_new")  # version 2 staged
    assert _visible(tree_hash(repo)) == before and _leftovers(repo)
    result = run_cli("ship", engine, "--repo", repo)
    assert result.returncode == 0, result.stderr
    _assert_versions_intact(repo, [1, 2])
    after = tree_hash(repo)
    assert {k: v for k, v in after.items() if k in before} == before


def test_stale_temp_of_a_live_process_is_kept(shipped, engine):
    """Only dead ships' leftovers are removed: a concurrent ship's staging folder stays."""
    live = shipped / "tiny" / f".2.tmp-{os.getppid()}-0123abcd"  # our parent (pytest's) pid is alive
    live.mkdir()
    dead = shipped / "tiny" / ".2.tmp-999999999-0123abcd"  # no such pid
    dead.mkdir()
    assert ship(engine, ShipConfig(repo=shipped)).name == "2"  # in-process: this is about the cleanup rule
    assert live.is_dir() and not dead.exists()


def test_hostile_paths_give_one_line(engine, tmp_path):
    """Names too long for the file system (a 300-char component, a 4,400-char path): one line, nothing left."""
    from mpdeploy.core.errors import MpdeployError

    before = tree_hash(tmp_path)
    deep = Path(*(["d" * 200] * 22))
    cases = [
        (engine, ShipConfig(repo=tmp_path / ("r" * 300)), "use a shorter --repo"),
        (engine, ShipConfig(repo=tmp_path / deep), "use a shorter --repo"),
        (engine, ShipConfig(repo=tmp_path / "repo", name="n" * 300), "use a shorter --repo or --name"),
        (tmp_path / deep, ShipConfig(repo=tmp_path / "repo"), "File name too long"),
    ]
    for engine_dir, config, fragment in cases:
        with pytest.raises(MpdeployError, match=fragment) as info:
            ship(engine_dir, config)
        assert "\n" not in str(info.value) and len(str(info.value)) < 400
        assert tree_hash(tmp_path) == before
    # and through the CLI: exit 2, one line
    assert_one_line_error(run_cli("ship", engine, "--repo", tmp_path / deep), "File name too long")

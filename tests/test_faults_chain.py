"""Faults around the artifact chain (issue 15): hostile paths, a full disk, corrupt engines, killed runs.

Each bad case: exit 2, exactly one stderr line naming the fix, no traceback, and nothing a later stage
accepts. The chain is one small build (timm:test_resnet, ort, fp32) made once for the module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
# timm's tiny test_resnet, random init (seeded), 10 classes: seconds per stage, no zoo training needed.
MODEL_ARGS = ["timm:test_resnet", "--weights", "random", "--input-shape", "3,32,32", "--num-classes", "10"]
BUILD = ["--sparse", "--backend", "ort", "--precision", "fp32", "--threads", "1", "--calib", "digits",
         "--calib-batches", "2", "--batch-sizes", "1,4", "--max-eval-images", "32", "--warmup", "1", "--repeats", "2",
         "--sensitivity-batch", "4", "--no-plots", "--max-top1-drop", "1.0"]
AUDIT = ["--backend", "ort", "--max-eval-images", "16", "--repeats", "1", "--warmup", "0", "--no-plots",
         "--sensitivity-batch", "0", "--batch-sizes", "1,4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "vit"
    assert cli_main(["-q", "build", *MODEL_ARGS, *BUILD, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(root, tmp_path) -> Path:
    dst = tmp_path / "engines" / "vit"
    shutil.copytree(root, dst)
    return dst


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def no_temps(folder: Path) -> bool:
    return not any(".tmp-" in p.name or ".old-" in p.name for p in folder.iterdir())


def test_path_component_too_long(root, tmp_path, capsys):
    out = tmp_path / ("x" * 300) / "onnx"
    line = one_line(capsys, cli_main(["-q", "export", str(root / "pruned"), "--out", str(out)]))
    assert "path too long" in line and "shorter --out" in line


def test_out_of_4400_characters(root, tmp_path, capsys):
    out = tmp_path.joinpath(*(["abcdefghij" * 10] * 44)) / "onnx"
    assert len(str(out)) > 4400
    line = one_line(capsys, cli_main(["-q", "export", str(root / "pruned"), "--out", str(out)]))
    assert "path too long" in line


@pytest.mark.parametrize("out", [".", ".."])
def test_out_dot(root, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    line = one_line(capsys, cli_main(["-q", "export", str(root / "pruned"), "--out", out]))
    assert "--out" in line or "names no folder" in line
    assert os.listdir(tmp_path) == []


def test_out_is_a_file(root, tmp_path, capsys):
    target = tmp_path / "onnx"
    target.write_text("mine")
    line = one_line(capsys, cli_main(["-q", "export", str(root / "pruned"), "--out", str(target)]))
    assert "is a file" in line and target.read_text() == "mine"


def test_report_out_below_a_file(root, tmp_path, capsys):
    (tmp_path / "FILE").write_text("x")
    line = one_line(capsys, cli_main(["-q", "report", str(root), "--out", str(tmp_path / "FILE" / "r.md")]))
    assert "is a file" in line


def test_disk_full_during_prune(tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError: still one 'disk full' line, nothing kept."""
    import safetensors
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "vit" / "pruned"
    line = one_line(capsys, cli_main(["-q", "prune", *MODEL_ARGS, "--out", str(out)]))
    assert line.startswith("mpdeploy prune: error: disk full")
    assert not out.exists() and no_temps(out.parent)


def test_disk_full_during_export(root, tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "onnx"
    line = one_line(capsys, cli_main(["-q", "export", str(root / "pruned"), "--out", str(out)]))
    assert "disk full" in line
    assert not out.exists() and no_temps(tmp_path)


def test_truncated_engine_with_updated_manifest(copy, capsys):
    """The manifest says the truncated file is right (hashes updated): the audit still fails in one line."""
    engine = copy / "engine-ort"
    sparse = engine / "sparse.onnx"
    sparse.write_bytes(sparse.read_bytes()[:2000])
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["files"]["sparse.onnx"] = manifest["file_sha256"]["sparse.onnx"] = artifacts.sha256_file(sparse)
    manifest[artifacts.SELF_HASH] = artifacts.sha256_json({k: v for k, v in manifest.items()
                                                           if k != artifacts.SELF_HASH})  # a thorough forger
    (engine / "manifest.json").write_text(json.dumps(manifest))
    old = artifacts.manifest_hash(copy / "audit")
    line = one_line(capsys, cli_main(["-q", "audit", str(copy), *AUDIT]))
    assert "cannot be loaded" in line and "rebuild" in line
    assert artifacts.manifest_hash(copy / "audit") == old  # the old audit stays (and no longer verifies)
    with pytest.raises(Exception, match="changed after"):
        artifacts.read_manifest(copy / "audit", "audit")


def test_engine_source_missing(copy, capsys):
    shutil.rmtree(copy / "onnx")
    line = one_line(capsys, cli_main(["-q", "audit", str(copy), *AUDIT]))
    assert "onnx source" in line and "missing" in line


def test_pruned_weights_are_world_readable(root):
    for name in ("model.safetensors", "dense.safetensors", "masks.safetensors"):
        assert (root / "pruned" / name).stat().st_mode & 0o044 == 0o044


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_audit_temp_of_a_killed_run_is_cleaned_by_the_next_audit(copy, capsys):
    stale = copy / f".audit.tmp-{_dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "audit.json").write_text("{}")
    live = copy / f".audit.tmp-{os.getpid()}-live0000"  # a concurrent run's: must survive
    live.mkdir()
    assert cli_main(["-q", "audit", str(copy), *AUDIT]) == 0
    assert not stale.exists() and live.exists()


def _run(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mpdeploy", "-q", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------------
# Ctrl-C: exit 130 and one line wherever it lands (issue 23). The child is the console script itself
# (`from mpdeploy.cli import main; sys.exit(main())`) with one hook placed before main() runs; the hook
# prints HOOK on stdout at a known moment and waits there, so the signal lands exactly where the test
# means it to: no sleeps, no race with the stage.

HOOKS = {
    # while argument parsing imports the command's module: before the stage's try
    "parse": "import time, mpdeploy.cli as c\n_b = c.build_parser\n"
             "def _hooked(*a, **k):\n    print('HOOK', flush=True); time.sleep(600); return _b(*a, **k)\n"
             "c.build_parser = _hooked\n",
    # inside the stage, its temporary folder made and filled: every stage writes its manifest last
    "stage": "import time\nfrom mpdeploy.core import artifacts\n"
             "def _hooked(*a, **k):\n    print('HOOK', flush=True); time.sleep(600)\n"
             "artifacts.write_manifest = _hooked\n",
    # after the stage finished, while the interpreter tears down its modules (past the point where
    # Python puts SIGINT back to its default action: the signal killed the process there, exit -2)
    "teardown": "import os, time\nclass _Late:\n"
                "    def __del__(self, write=os.write, sleep=time.sleep):\n        write(1, b'HOOK\\n'); sleep(3)\n"
                "_late = _Late()\n",
    # no wait: marks the moment main() is about to run (the random-moment loop counts from it)
    "ready": "print('HOOK', flush=True)\n",
}


def _run_hooked(argv: list[str], hook: str) -> subprocess.Popen:
    code = f"import sys\nfrom mpdeploy.cli import main\n{HOOKS[hook]}sys.exit(main())\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, "-q", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_hook(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.strip() == "HOOK":
            return
    _, err = proc.communicate()
    raise AssertionError(f"the child ended (code {proc.returncode}) before its hook: {err[-2000:]}")


def _stage_argv(copy: Path, stage: str) -> tuple[list[str], str]:
    """(command line, artifact folder name) of `stage` on the copied chain."""
    if stage == "export":
        return ["export", str(copy / "pruned"), "--out", str(copy / "onnx")], "onnx"
    if stage == "engine":
        return ["engine", str(copy / "onnx"), "--backend", "ort", "--precision", "fp32", "--force"], "engine-ort"
    return ["audit", str(copy), *AUDIT], "audit"


def _interrupted_cleanly(proc: subprocess.Popen, err: str) -> None:
    assert proc.returncode == 130, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted; no partial artifact was kept" in lines[0], err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("stage", ["export", "engine", "audit"])
def test_signal_during_a_stage_then_rerun(copy, sig, stage):
    argv, name = _stage_argv(copy, stage)
    before = artifacts.manifest_hash(copy / name)
    proc = _run_hooked(argv, "stage")
    _wait_for_hook(proc)
    assert any(p.name.startswith(f".{name}.tmp-") for p in copy.iterdir())  # it is mid-write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        _interrupted_cleanly(proc, err)
        assert no_temps(copy)
    else:
        assert proc.returncode == -signal.SIGKILL
    assert artifacts.manifest_hash(copy / name) == before  # the earlier artifact is untouched
    # Whatever the signal left, the folder is not accepted half-made, and a re-run succeeds and cleans up.
    rerun = _run(argv)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert no_temps(copy)
    artifacts.read_manifest(copy / name, {"export": "onnx", "engine": "engine", "audit": "audit"}[stage])


def test_ctrl_c_before_the_stage_starts(copy):
    """A Ctrl-C while the command line is parsed (the command's module importing) used to escape main()'s
    try: Python then killed its own process with SIGINT (exit -2, no line)."""
    argv, _ = _stage_argv(copy, "export")
    proc = _run_hooked(argv, "parse")
    _wait_for_hook(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    _interrupted_cleanly(proc, err)
    assert no_temps(copy)


def test_ctrl_c_after_the_stage_finished(copy):
    """A Ctrl-C during interpreter teardown, after the stage wrote its artifact: the run has succeeded,
    so the signal is ignored (exit 0, nothing on stderr). Before the fix it killed the process (-2):
    Python restores SIGINT's default action while finalizing."""
    argv, name = _stage_argv(copy, "export")
    proc = _run_hooked(argv, "teardown")
    _wait_for_hook(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.strip() == "", (proc.returncode, err)
    artifacts.read_manifest(copy / name, "onnx")


@pytest.mark.slow
def test_ctrl_c_at_random_moments_under_load(copy, tmp_path):
    """Many Ctrl-Cs at seeded random moments of each stage (from main() starting to the process ending),
    with a CPU hog on every core: each run ends either interrupted (130, one line, no temporary folder)
    or, when the signal came after the stage, finished (0, quiet, its artifact verified). Nothing else."""
    import random

    rng = random.Random(23)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    counts: dict[str, int] = {}
    bad = []
    try:
        for stage in ("export", "engine", "audit"):
            argv, name = _stage_argv(copy, stage)
            kind = {"export": "onnx", "engine": "engine", "audit": "audit"}[stage]
            proc = _run_hooked(argv, "ready")
            _wait_for_hook(proc)
            t_ready = time.monotonic()
            proc.communicate(timeout=600)
            assert proc.returncode == 0
            span = time.monotonic() - t_ready  # one whole run, from its hook: the range of moments
            for trial in range(TRIALS_PER_STAGE):
                delay = rng.uniform(0.0, span * 1.1)
                proc = _run_hooked(argv, "ready")
                _wait_for_hook(proc)
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=600)
                lines = err.strip().splitlines()
                if proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0] and no_temps(copy):
                    outcome = "interrupted"
                elif proc.returncode == 0 and not lines and no_temps(copy):
                    artifacts.read_manifest(copy / name, kind)
                    outcome = "finished"
                else:
                    outcome = "wrong"
                    bad.append((stage, round(delay, 3), proc.returncode, err[-500:]))
                counts[f"{stage}:{outcome}"] = counts.get(f"{stage}:{outcome}", 0) + 1
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print("ctrl-c outcomes:", counts)
    assert not bad, bad


TRIALS_PER_STAGE = int(os.environ.get("MPDEPLOY_CTRL_C_TRIALS", "20"))


def test_two_engine_builds_into_one_out(copy, tmp_path):
    out = tmp_path / "eng"
    argv = ["engine", str(copy / "onnx"), "--backend", "ort", "--precision", "fp32", "--out", str(out), "--force"]
    procs = [_run(argv), _run(argv)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    artifacts.read_manifest(out, "engine")
    assert no_temps(tmp_path)

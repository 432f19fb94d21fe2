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

from mpdeploy import artifacts
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


def _wait_for_temp(folder: Path, name: str, proc: subprocess.Popen, limit: float = 120.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and proc.poll() is None:
        if any(p.name.startswith(f".{name}.tmp-") for p in folder.iterdir()):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("stage", ["export", "engine", "audit"])
def test_signal_during_a_stage_then_rerun(copy, tmp_path, sig, stage):
    if stage == "export":
        argv = ["export", str(copy / "pruned"), "--out", str(copy / "onnx")]
        name = "onnx"
    elif stage == "engine":
        argv = ["engine", str(copy / "onnx"), "--backend", "ort", "--precision", "fp32", "--force"]
        name = "engine-ort"
    else:  # many timing rounds so the kill lands inside the audit
        argv = ["audit", str(copy), *AUDIT[:-2], "--batch-sizes", "1,4", "--repeats", "400"]
        name = "audit"
    proc = _run(argv)
    if stage != "audit":
        landed = _wait_for_temp(copy, name, proc)
    else:  # the audit's temporary folder exists only while it writes: signal it while it measures
        time.sleep(8)
        landed = proc.poll() is None
    if not landed:
        proc.kill()
        pytest.skip("the stage finished before the signal could land")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert no_temps(copy)
    # Whatever the signal left, the folder is not accepted half-made, and a re-run succeeds and cleans up.
    rerun = _run(argv if stage != "audit" else [*argv[:-2], "--repeats", "1"])
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert no_temps(copy)
    artifacts.read_manifest(copy / name, {"export": "onnx", "engine": "engine", "audit": "audit"}[stage])


def test_two_engine_builds_into_one_out(copy, tmp_path):
    out = tmp_path / "eng"
    argv = ["engine", str(copy / "onnx"), "--backend", "ort", "--precision", "fp32", "--out", str(out), "--force"]
    procs = [_run(argv), _run(argv)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    artifacts.read_manifest(out, "engine")
    assert no_temps(tmp_path)

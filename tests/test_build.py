"""`mpdeploy build` end to end on CPU (ort): artifacts, the engine contract, stage reuse, --force, kill -9."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def _stages(root: Path) -> dict[str, str]:
    summary = json.loads((root / "build_summary.json").read_text())
    return {s["stage"]: s["status"] for s in summary["stages"]}


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _check_engine_folder(root: Path, variants: tuple[str, ...], chw: list[int], classes: int,
                         weights: str = "pruned") -> dict:
    """The engine contract ship.py and audit.py read."""
    from mpdeploy.onnx.trt_rules import check_trt_sparsity

    engine = root / "engine-ort"
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["schema"] == "mpdeploy.engine/1" and manifest["kind"] == "engine"
    assert manifest["backend"] == "ort" and manifest["precision"] == "fp32"
    assert manifest["variants"] == {v: f"{v}.onnx" for v in variants}
    assert manifest["io"] == {"inputs": [{"name": "input", "dtype": "float32", "shape": [-1, *chw]}],
                              "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, classes]}]}
    assert manifest["device"]["gpu"] is None and manifest["device"]["tensorrt_version"] is None
    assert manifest["sources"] == {
        "onnx": {"path": "../onnx", "manifest_sha256": artifacts.manifest_hash(root / "onnx")},
        "weights": {"path": f"../{weights}", "manifest_sha256": artifacts.manifest_hash(root / weights)}}
    for rel, digest in manifest["file_sha256"].items():
        assert artifacts.sha256_file(engine / rel) == digest
    assert set(manifest["variants"].values()) <= set(manifest["file_sha256"])
    assert manifest["backend_reason"].startswith("asked for (onnxruntime")
    report = json.loads((engine / "build_report.json").read_text())
    assert report["backend"] == "ort" and report["device"]["cpu"]
    assert set(report["variants"]) == set(variants) and set(report["build_seconds"]) == set(variants)
    assert all(report["engine_bytes"][v] > 0 for v in variants)
    assert any("no 2:4 sparse kernels" in note for note in report["notes"])
    assert report["onnx_sparsity_summary"]["eligible_2_4"] > 0
    # The export artifact passes its own checks and carries the 2:4 weights into the sparse engine.
    artifacts.read_manifest(root / "onnx", "onnx", verify=True)
    sparsity = json.loads((root / "onnx" / "sparsity.json").read_text())
    assert sparsity["summary"]["eligible_2_4"] == sparsity["summary"]["runs_sparse"] > 0
    assert sparsity["ort_check"]["max_abs_diff_sparse"] < 1e-4
    if "sparse" in variants:
        checked = check_trt_sparsity(onnx.load(str(engine / "sparse.onnx")))
        assert sum(v["eligible"] and v["is_2_4"] for v in checked.values()) == sparsity["summary"]["eligible_2_4"]
    return manifest


def test_cli_resnet18_sparse_ort_then_reuse(tmp_path, capsys):
    root = tmp_path / "engines" / "r18"
    argv = ["build", "timm:resnet18", "--sparse", "--backend", "ort", "--no-audit", "--weights", "random",
            "--input-shape", "3,64,64", "--out", str(root), "--threads", "1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "prune" in out and "built" in out and "eligible 2:4" in out
    assert _stages(root) == {"prune": "built", "export": "built", "build": "built", "audit": "skipped",
                             "densify": "skipped"}
    assert "pruned for ort" in out and "no per-layer report of sparse use" in out
    _check_engine_folder(root, ("sparse", "dense"), [3, 64, 64], 1000)
    pruned = artifacts.read_manifest(root / "pruned", "pruned")
    assert pruned["model"]["source"]["init_seed"] == 0  # random init, seeded: reuse is sound
    # Pruned for the backend: ONNX Runtime on CPU has no sparse kernels, so TensorRT's rules, said in one line.
    assert pruned["pruned_for"]["backend"] == "ort" and pruned["pruned_for"]["rules"].startswith("TensorRT")
    assert "no sparse kernels" in pruned["pruned_for"]["note"] and pruned["config"]["backend"] == "ort"
    before = {d: _mtimes(root / d) for d in ("pruned", "onnx", "engine-ort")}

    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reused") == 3
    assert _stages(root) == {"prune": "reused", "export": "reused", "build": "reused", "audit": "skipped",
                             "densify": "skipped"}
    assert {d: _mtimes(root / d) for d in before} == before  # nothing rewritten


@pytest.fixture(scope="module")
def vit_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines") / "tvit"


def test_dense_only_then_sparse_then_force(vit_root, capsys):
    base = ["build", "timm:test_vit", "--backend", "ort", "--no-audit", "--weights", "random", "--out", str(vit_root)]
    assert cli_main(base) == 0  # no --sparse: dense engine only
    assert _stages(vit_root) == {"prune": "built", "export": "built", "build": "built", "audit": "skipped"}
    manifest = _check_engine_folder(vit_root, ("dense",), [3, 160, 160], 1000)
    assert not (vit_root / "engine-ort" / "sparse.onnx").exists()
    report = json.loads((vit_root / "engine-ort" / "build_report.json").read_text())
    assert any("dense-only" in note for note in report["notes"])

    assert cli_main([*base, "--sparse"]) == 0  # prune and export reused; the engine gains its sparse half
    assert _stages(vit_root) == {"prune": "reused", "export": "reused", "build": "built", "audit": "skipped",
                                 "densify": "skipped"}
    _check_engine_folder(vit_root, ("sparse", "dense"), [3, 160, 160], 1000)

    before = _mtimes(vit_root / "onnx")
    created = json.loads((vit_root / "engine-ort" / "manifest.json").read_text())["created"]
    time.sleep(1.1)  # manifests record seconds
    assert cli_main([*base, "--sparse", "--force", "--no-densify"]) == 0
    assert _stages(vit_root) == {"prune": "built", "export": "built", "build": "built", "audit": "skipped",
                                 "densify": "skipped"}
    after = _mtimes(vit_root / "onnx")
    assert all(after[k] != before[k] for k in before)
    assert json.loads((vit_root / "engine-ort" / "manifest.json").read_text())["created"] != created
    assert manifest["config_hash"] != json.loads((vit_root / "engine-ort" / "manifest.json").read_text())["config_hash"]
    capsys.readouterr()


def test_changed_engine_file_is_rebuilt(vit_root, tmp_path):
    def engine_is_complete(folder, config_hash, inputs):  # the one reuse rule, for engines
        root = Path(folder).parent
        return artifacts.is_complete(folder, "engine", config_hash, inputs,
                                     sources={"onnx": root / "onnx", "weights": root / "pruned"})

    if not (vit_root / "engine-ort" / "sparse.onnx").exists():
        pytest.skip("needs test_dense_only_then_sparse_then_force first")
    copy = tmp_path / "tvit"
    shutil.copytree(vit_root, copy)
    manifest = json.loads((copy / "engine-ort" / "manifest.json").read_text())
    assert engine_is_complete(copy / "engine-ort", manifest["config_hash"], manifest["inputs"])
    with open(copy / "engine-ort" / "sparse.onnx", "ab") as f:
        f.write(b"\0")
    assert not engine_is_complete(copy / "engine-ort", manifest["config_hash"], manifest["inputs"])
    assert not engine_is_complete(copy / "engine-ort", manifest["config_hash"], {**manifest["inputs"], "device": "x"})


def test_kill_during_export_leaves_nothing_a_rerun_reuses(tmp_path):
    root = tmp_path / "engines" / "tres"
    argv = ["build", "timm:test_resnet", "--sparse", "--backend", "ort", "--no-audit", "--weights", "random",
            "--input-shape", "3,32,32", "--out", str(root)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mpdeploy", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    partial: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(root.glob(".onnx.tmp-*"))
            if partial and (root / "pruned" / "manifest.json").exists():
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"build ended before the export stage was caught: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert partial and partial[0].exists()  # kill -9: no cleanup ran
    assert not (root / "onnx").exists()
    assert not (root / "engine-ort").exists()

    from mpdeploy.export.stage import ExportConfig
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.prune.stage import PruneConfig
    from mpdeploy.backends.base import BuildConfig
    from mpdeploy.pipeline.build import BuildStageConfig, run_build

    spec = ModelSpec("timm:test_resnet", weights="random", input_shape=(3, 32, 32))
    configs = (PruneConfig(), ExportConfig(), BuildConfig(batch_sizes=(1, 4), threads=1))
    stage = BuildStageConfig(backend="ort", out=root)
    result = run_build(spec, *configs, stage)
    audited = "built" if importlib.util.find_spec("mpdeploy.audit") else "skipped"
    assert [(s.stage, s.status) for s in result.stages] == [
        ("prune", "reused"), ("export", "built"), ("build", "built"), ("audit", audited),
        ("densify", "skipped")]  # ort: no per-layer report of sparse use (pipeline.build._densify_round)
    assert not list(root.glob(".*.tmp-*"))  # the dead process's temp folder was cleaned up
    if audited == "built":  # the audit stage is reused too, and it audited these engines
        audit = json.loads((root / "audit" / "audit.json").read_text())
        assert audit["engine"]["manifest_sha256"] == artifacts.manifest_hash(root / "engine-ort")
        again = run_build(spec, *configs, stage)
        assert {s.stage: s.status for s in again.stages} == {"prune": "reused", "export": "reused", "build": "reused",
                                                             "audit": "reused", "densify": "skipped"}


def test_model_fingerprint_follows_the_seed():
    from mpdeploy.pipeline.build import load_seeded_model, model_fingerprint
    from mpdeploy.models.spec import ModelSpec

    spec = ModelSpec("timm:test_resnet", weights="random", input_shape=(3, 32, 32))
    a, b, c = load_seeded_model(spec, 0), load_seeded_model(spec, 0), load_seeded_model(spec, 1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    assert a.source["init_seed"] == 0


def test_stale_temp_cleanup_spares_live_processes(tmp_path):
    from mpdeploy.core.atomic import clean_stale_temps

    target = tmp_path / "onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".onnx.tmp-{dead.pid}-abcd1234"
    live = tmp_path / f".onnx.tmp-{os.getpid()}-abcd1234"
    stale.mkdir()
    live.mkdir()
    assert clean_stale_temps(target) == [stale]
    assert live.exists() and not stale.exists()


def test_unusable_backend_fails_in_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    rc = cli_main(["build", "timm:test_resnet", "--backend", "trt", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("mpdeploy build: error: backend 'trt' is not usable here: TensorRT is not installed")
    assert not (tmp_path / "x").exists()  # failed before loading or writing anything


@pytest.mark.slow
def test_cli_vit_tiny_224_with_audit(tmp_path, capsys):
    """The real ViT geometry (224, 12 blocks) through every stage, audit included when it is installed."""
    root = tmp_path / "engines" / "vit_tiny"
    argv = ["build", "timm:vit_tiny_patch16_224", "--sparse", "--backend", "ort", "--weights", "random",
            "--out", str(root), "--batch-sizes", "1,8", "--threads", "2"]
    code = cli_main(argv)
    stages = _stages(root)
    assert stages["prune"] == stages["export"] == stages["build"] == "built"
    _check_engine_folder(root, ("sparse", "dense"), [3, 224, 224], 1000)
    assert stages["audit"] == "built"
    audit = json.loads((root / "audit" / "audit.json").read_text())
    assert audit["backend"] == "ort" and "passed" in audit and audit["summary"]
    assert code == (0 if audit["passed"] else 1)  # build's exit code carries the audit verdict
    assert cli_main(argv) == code
    assert _stages(root) == {"prune": "reused", "export": "reused", "build": "reused", "audit": "reused",
                             "densify": "skipped"}
    speed = audit["thresholds"]["speed_gate"]  # ONNX Runtime on CPU: no sparse kernels, no speed claim
    assert speed["sparse_kernels"] is False and speed["verdict"].startswith("no speed claim")
    capsys.readouterr()


@pytest.mark.slow
def test_default_model_digits_vit(tmp_path, capsys, monkeypatch):
    """`mpdeploy build --sparse` with no model: the embedded zoo:digits_vit (trained on first use)."""
    monkeypatch.setenv("MPDEPLOY_ZOO_DIR", str(tmp_path / "zoo"))
    root = tmp_path / "engines" / "digits_vit"
    assert cli_main(["build", "--sparse", "--backend", "ort", "--out", str(root), "--threads", "2"]) == 0
    chw = artifacts.read_manifest(root / "pruned", "pruned")["model"]["input_shape"]
    _check_engine_folder(root, ("sparse", "dense"), chw, 10, weights="distilled")
    stages = _stages(root)
    # The default runs the whole method: digits calibration, 3 epochs of distillation, a passing audit.
    assert stages["distill"] == "built" and stages["audit"] == "built"
    distilled = artifacts.read_manifest(root / "distilled", "pruned")
    assert distilled["distill"]["input_manifest_sha256"] == artifacts.manifest_hash(root / "pruned")
    assert json.loads((root / "audit" / "audit.json").read_text())["passed"] is True
    capsys.readouterr()


def test_build_with_distillation_exports_the_distilled_weights(tmp_path, capsys):
    root = tmp_path / "engines" / "cnnd"
    # 64 labelled images: one epoch is a second (distilling on all of digits made this the slowest test)
    data = tmp_path / "few.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.standard_normal((64, 1, 32, 32)).astype(np.float32),
             labels=rng.integers(0, 10, 64))
    base = ["build", "zoo:digits_cnn", "--sparse", "--backend", "ort", "--no-audit", "--out", str(root),
            "--threads", "1", "--distill-data", str(data), "--eval-data", str(data)]
    assert cli_main([*base, "--distill-epochs", "1"]) == 0
    stages = _stages(root)
    assert stages["distill"] == "built" and stages["export"] == "built"
    onnx_inputs = artifacts.read_manifest(root / "onnx", "onnx")["inputs"]
    assert onnx_inputs["pruned_manifest"] == artifacts.manifest_hash(root / "distilled")
    assert cli_main([*base, "--distill-epochs", "1"]) == 0
    assert _stages(root)["distill"] == "reused" and _stages(root)["export"] == "reused"
    # Without distillation the export must come from pruned/ again, not keep the distilled weights.
    assert cli_main(base) == 0
    assert "distill" not in _stages(root) and _stages(root)["export"] == "built"
    onnx_inputs = artifacts.read_manifest(root / "onnx", "onnx")["inputs"]
    assert onnx_inputs["pruned_manifest"] == artifacts.manifest_hash(root / "pruned")
    capsys.readouterr()


def test_densify_round_summary_before_after_and_sparse_use_check():
    """The densify round's numbers as the summary shows them (the round itself needs a GPU backend)."""
    from mpdeploy.pipeline.build import before_after
    from mpdeploy.commands.build import key_numbers
    from mpdeploy.densify.evidence import Evidence, compare_sparse_use
    from mpdeploy.core.runner import StageResult

    first = StageResult("audit", "built", 1.0, None, {"passed": False, "summary": {
        "top1_sparse": 0.90, "top1_dense": 0.95, "agreement": 0.92, "speedup_p50": {"1": 0.9, "32": 0.97}}})
    second = StageResult("audit:densified", "built", 1.0, None, {"passed": True, "summary": {
        "top1_sparse": 0.94, "top1_dense": 0.95, "agreement": 0.97, "speedup_p50": {"1": 1.0, "32": 1.08}}})
    ba = before_after(first, second)
    assert ba["top1_sparse"] == [0.90, 0.94] and ba["speedup_p50_largest_batch"] == [0.97, 1.08]
    assert ba["passed"] == [False, True] and ba["largest_batch"] == [32, 32]

    # The rebuilt engine runs sparse exactly what stayed pruned: unchanged. Otherwise both directions are named.
    same = compare_sparse_use(["a", "b"], Evidence("log", ran_sparse=["b", "a"]))
    assert same["unchanged"] and same["no_longer_sparse"] == same["newly_sparse"] == []
    moved = compare_sparse_use(["a", "b"], Evidence("log", ran_sparse=["a", "c"], ran_dense={"b": "not picked"}))
    assert not moved["unchanged"] and moved["no_longer_sparse"] == ["b"] and moved["newly_sparse"] == ["c"]

    densify = StageResult("densify", "built", 0.1, None, {"returned": {"x": "not picked", "y": "not picked"},
                                                          "ran_sparse": ["a", "b"], "before_after": ba, "check": moved})
    text = key_numbers(densify)
    assert text.startswith("2 layers dense again, 2 still sparse")
    assert "top1_sparse 0.9000 -> 0.9400" in text and "b32: 0.97 -> 1.08" in text
    assert "CHANGED sparse use: no longer sparse ['b'], newly sparse ['c']" in text
    densify.details["check"] = same
    assert "other layers' sparse use unchanged" in key_numbers(densify)
    assert key_numbers(second).startswith("passed, top1_dense 0.9500")  # a densified round's rows read as the first's

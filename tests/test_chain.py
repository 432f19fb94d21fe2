"""One verifiable chain: model -> pruned -> distilled -> onnx -> engine -> audit -> ship.

One small build (timm:test_resnet, ort, fp32, one distillation epoch) is made once; every test works on
it or on a copy it tampers with.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
# timm's tiny test_resnet, random init (seeded), 10 classes: seconds per stage, no zoo training needed.
MODEL_ARGS = ["timm:test_resnet", "--weights", "random", "--input-shape", "3,32,32", "--num-classes", "10"]
BUILD_ARGS = ["--sparse", "--backend", "ort", "--precision", "fp32", "--threads", "1", "--distill-epochs", "1",
              "--calib", "digits", "--calib-batches", "2", "--batch-sizes", "1,4", "--max-eval-images", "64",
              "--warmup", "1", "--repeats", "2", "--sensitivity-batch", "8", "--no-plots", "--max-top1-drop", "1.0"]


@pytest.fixture(scope="module")
def chain_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chain") / "vit"
    assert cli_main(["-q", "build", *MODEL_ARGS, *BUILD_ARGS, "--out", str(root)]) == 0
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "engines" / root.name
    shutil.copytree(root, dst)
    return dst


def _one_error_line(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code, err
    lines = [line for line in err if not line.startswith(("INFO", "WARNING", "DEBUG"))]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_audit_compares_the_engine_with_the_distilled_weights(chain_root):
    audit = artifacts.read_manifest(chain_root / "audit", "audit")
    assert audit["sources"]["weights"]["path"] == "../distilled"
    assert audit["sources"]["engine"]["path"] == "../engine-ort"
    assert audit["inputs"]["pruned_manifest"] == artifacts.manifest_hash(chain_root / "distilled")
    assert audit["sources"]["weights"]["manifest_sha256"] == artifacts.manifest_hash(chain_root / "distilled")
    result = json.loads((chain_root / "audit" / "audit.json").read_text())
    reference = result["engine_vs_pytorch"]
    assert reference["weights"] == "distilled"
    for which in ("sparse", "dense"):
        assert reference[which]["relative"] < 1e-4, reference  # fp32 rounding: the engine computes these weights
    assert not any("differs from the PyTorch model" in w for w in result["warnings"])
    engine = artifacts.read_manifest(chain_root / "engine-ort", "engine")
    assert engine["sources"]["weights"]["path"] == "../distilled" and engine["sources"]["onnx"]["path"] == "../onnx"
    assert engine["runtime"]["threads"] == 1
    onnx = artifacts.read_manifest(chain_root / "onnx", "onnx")
    assert onnx["sources"]["weights"]["path"] == "../distilled"
    distilled = artifacts.read_manifest(chain_root / "distilled", "distilled")
    assert distilled["kind"] == "distilled" and distilled["sources"]["pruned"]["path"] == "../pruned"
    pruned = artifacts.read_manifest(chain_root / "pruned", "pruned")
    assert pruned["kind"] == "pruned" and "distill" not in pruned  # the input was never rewritten


def test_rerun_reuses_every_stage(chain_root):
    assert cli_main(["-q", "build", *MODEL_ARGS, *BUILD_ARGS, "--out", str(chain_root)]) == 0
    summary = json.loads((chain_root / "build_summary.json").read_text())
    assert {s["stage"]: s["status"] for s in summary["stages"]} == {
        "prune": "reused", "distill": "reused", "export": "reused", "build": "reused", "audit": "reused",
        "densify": "skipped"}  # ONNX Runtime on CPU has no sparse kernels: nothing to give back
    densify = next(s for s in summary["stages"] if s["stage"] == "densify")
    assert "no sparse kernels" in json.dumps(densify)


def _tamper(folder: Path, how: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    if how == "edited file":
        rel = sorted(manifest["files"])[0]
        with open(folder / rel, "ab") as f:
            f.write(b"\0")
    elif how == "extra file":
        (folder / "notes.txt").write_text("not listed")
    elif how == "edited manifest":  # a field changed, every file hash still right
        manifest["config"] = {"forged": True}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:  # the same edit, and the manifest's own hash deleted (as if written before it existed)
        manifest["config"] = {"forged": True}
        del manifest[artifacts.SELF_HASH]
        (folder / "manifest.json").write_text(json.dumps(manifest))


def _next_stage(root: Path, kind_dir: str, tmp_path: Path) -> list[str]:
    return {
        "pruned": ["export", str(root / "pruned"), "--out", str(tmp_path / "onnx2")],
        "distilled": ["export", str(root / "distilled"), "--out", str(tmp_path / "onnx2")],
        "onnx": ["engine", str(root / "onnx"), "--backend", "ort", "--precision", "fp32",
                 "--out", str(tmp_path / "engine2")],
        "engine-ort": ["audit", str(root), "--backend", "ort", "--max-eval-images", "8", "--repeats", "1",
                       "--no-plots", "--sensitivity-batch", "0"],
        "audit": ["ship", str(root), "--repo", str(tmp_path / "repo")],
    }[kind_dir]


@pytest.mark.parametrize("how", ["edited file", "extra file", "edited manifest", "self hash deleted"])
@pytest.mark.parametrize("kind_dir", ["pruned", "distilled", "onnx", "engine-ort", "audit"])
def test_tampered_artifact_is_refused_by_the_next_stage(chain_root, tmp_path, capsys, kind_dir, how):
    root = _copy(chain_root, tmp_path)
    _tamper(root / kind_dir, how)
    capsys.readouterr()
    line = _one_error_line(capsys, cli_main(_next_stage(root, kind_dir, tmp_path)))
    assert "error:" in line
    for made in ("onnx2", "engine2", "repo"):
        assert not (tmp_path / made / "manifest.json").exists()


@pytest.mark.parametrize("upstream", ["pruned", "distilled"])
def test_changed_source_is_refused_down_the_chain(chain_root, tmp_path, capsys, upstream):
    """The engine stage reads onnx/, yet a change two or three links up (weights) is refused."""
    root = _copy(chain_root, tmp_path)
    _tamper(root / upstream, "edited manifest")
    line = _one_error_line(capsys, cli_main(_next_stage(root, "onnx", tmp_path)))
    assert "changed after" in line or "does not match" in line, line


def _strip_source(folder: Path, role: str) -> None:
    """The manifest without source `role`, honestly re-hashed (as an older mpdeploy wrote it, or a forger)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sources"][role]
    manifest[artifacts.SELF_HASH] = artifacts.sha256_json({k: v for k, v in manifest.items() if k != artifacts.SELF_HASH})
    (folder / "manifest.json").write_text(json.dumps(manifest))


REQUIRED_SOURCES = [("distilled", "pruned"), ("onnx", "weights"), ("engine-ort", "onnx"), ("engine-ort", "weights"),
                    ("audit", "engine"), ("audit", "weights")]


@pytest.mark.parametrize("kind_dir,role", REQUIRED_SOURCES)
def test_manifest_without_a_required_source_is_refused(chain_root, tmp_path, capsys, kind_dir, role):
    """A folder that does not record what its kind is made from is refused when opened, and by the next
    stage in one line: nothing follows an artifact half-way."""
    from mpdeploy.core.errors import MpdeployError
    from mpdeploy.core.kinds import AuditFolder, EngineFolder, OnnxFolder, open_weights

    root = _copy(chain_root, tmp_path)
    _strip_source(root / kind_dir, role)
    artifacts.read_manifest(root / kind_dir, "pruned" if kind_dir == "distilled" else kind_dir.split("-")[0])
    opener = {"distilled": open_weights, "onnx": OnnxFolder.open, "engine-ort": EngineFolder.open,
              "audit": AuditFolder.open}[kind_dir]
    for verify in (True, False):
        with pytest.raises(MpdeployError, match=f"records no {role} source"):
            opener(root / kind_dir, verify=verify)
    line = _one_error_line(capsys, cli_main(_next_stage(root, kind_dir, tmp_path)))
    assert f"records no {role} source" in line, line
    for made in ("onnx2", "engine2", "repo"):
        assert not (tmp_path / made).exists()


def test_a_required_source_missing_deeper_in_the_chain_is_refused(chain_root, tmp_path, capsys):
    """An audit tied (by hash) to an engine that records no onnx source: the audit is refused too."""
    from mpdeploy.core.errors import MpdeployError
    from mpdeploy.core.kinds import AuditFolder

    root = _copy(chain_root, tmp_path)
    _strip_source(root / "engine-ort", "onnx")
    audit = json.loads((root / "audit" / "manifest.json").read_text())
    audit["sources"]["engine"]["manifest_sha256"] = audit["inputs"]["engine_manifest"] = artifacts.manifest_hash(
        root / "engine-ort")
    audit[artifacts.SELF_HASH] = artifacts.sha256_json({k: v for k, v in audit.items() if k != artifacts.SELF_HASH})
    (root / "audit" / "manifest.json").write_text(json.dumps(audit))
    with pytest.raises(MpdeployError, match=f"{root / 'engine-ort'}.* records no onnx source"):
        AuditFolder.open(root / "audit")
    line = _one_error_line(capsys, cli_main(["ship", str(root), "--repo", str(tmp_path / "repo")]))
    assert "records no onnx source" in line and not (tmp_path / "repo").exists()


def test_forged_audit_makes_ship_exit_2(chain_root, tmp_path, capsys):
    root = _copy(chain_root, tmp_path)
    path = root / "audit" / "audit.json"
    audit = json.loads(path.read_text())
    audit.update(passed=True, failures=[])
    audit["summary"]["top1_sparse"] = 0.999
    path.write_text(json.dumps(audit))
    line = _one_error_line(capsys, cli_main(["ship", str(root), "--repo", str(tmp_path / "repo")]))
    assert "audit.json" in line
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*.onnx"))


def test_engine_subcommand_builds_from_an_existing_onnx(chain_root, tmp_path, capsys):
    root = _copy(chain_root, tmp_path)
    out = root / "engine-ort-again"
    argv = ["engine", str(root / "onnx"), "--backend", "ort", "--precision", "fp32", "--out", str(out)]
    assert cli_main(argv) == 0
    assert "built" in capsys.readouterr().out
    manifest = artifacts.read_manifest(out, "engine")
    assert manifest["sources"]["weights"]["path"] == "../distilled"
    assert artifacts.sha256_file(out / "sparse.onnx") == artifacts.sha256_file(root / "engine-ort" / "sparse.onnx")
    assert cli_main(argv) == 0
    assert "reused" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prune", "export", "distill", "build", "engine"])
def test_out_on_a_users_folder_exits_2_and_keeps_the_file(chain_root, tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    argv = {
        "prune": ["prune", *MODEL_ARGS, "--out", str(mine)],
        "export": ["export", str(chain_root / "pruned"), "--out", str(mine)],
        "distill": ["distill", str(chain_root / "pruned"), "--epochs", "1", "--out", str(mine)],
        "build": ["build", *MODEL_ARGS, "--backend", "ort", "--no-audit", "--out", str(mine)],
        "engine": ["engine", str(chain_root / "onnx"), "--backend", "ort", "--out", str(mine)],
    }[command]
    line = _one_error_line(capsys, cli_main(argv))
    assert str(mine) in line and ("not an mpdeploy artifact" in line or "did not write" in line), line
    assert (mine / "thesis.tex").read_text() == "precious" and sorted(os.listdir(mine)) == ["thesis.tex"]


def test_out_of_another_kind_is_refused(chain_root, tmp_path, capsys):
    root = _copy(chain_root, tmp_path)
    before = artifacts.manifest_hash(root / "pruned")
    line = _one_error_line(capsys, cli_main(["export", str(root / "distilled"), "--out", str(root / "pruned")]))
    assert "'pruned' artifact, not 'onnx'" in line
    assert artifacts.manifest_hash(root / "pruned") == before


def test_distill_never_rewrites_its_input(chain_root, tmp_path, capsys):
    root = _copy(chain_root, tmp_path)
    line = _one_error_line(capsys, cli_main(["distill", str(root / "pruned"), "--epochs", "1",
                                             "--out", str(root / "pruned")]))
    assert "never rewrites its input" in line


def test_artifact_files_have_the_usual_modes(chain_root):
    if os.umask(0o022) != 0o022:
        os.umask(0o022)
    for kind_dir in ("pruned", "distilled", "onnx", "engine-ort", "audit"):
        for path in (chain_root / kind_dir).iterdir():
            assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))


def test_help_imports_no_torch():
    """`mpdeploy --help` and every `mpdeploy CMD --help` import no torch / onnx / timm."""
    from mpdeploy.cli import COMMANDS

    code = (
        "import sys\nfrom mpdeploy.cli import main\n"
        "for argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'timm'))\n"
        "print('HEAVY', heavy[:5], file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr[-400:]
    for name in COMMANDS:
        assert f"usage: mpdeploy {name}" in proc.stdout


STAGE_MODULES = {"prune", "export", "distill", "build", "stages", "engines", "audit", "ship", "analyze", "report",
                 "cli", "commands"}


def _mpdeploy_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mpdeploy"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("mpdeploy"))
    return names


def test_recorded_runtime_options_reach_the_audit_runners(chain_root, tmp_path, monkeypatch):
    from mpdeploy.backends.ort import OrtBackend

    seen = []
    original = OrtBackend.load

    def load(self, engine_path, config):
        seen.append((Path(engine_path).name, config.threads, dict(config.backend_options)))
        return original(self, engine_path, config)

    monkeypatch.setattr(OrtBackend, "load", load)
    root = _copy(chain_root, tmp_path)
    argv = ["-q", "audit", str(root), "--backend", "ort", "--max-eval-images", "8", "--repeats", "1", "--no-plots",
            "--sensitivity-batch", "0", "--batch-sizes", "1,4", "--max-top1-drop", "1.0"]
    assert cli_main(argv) == 0
    assert sorted(s[:2] for s in seen) == [("dense.onnx", 1), ("sparse.onnx", 1)]  # recorded at build time
    seen.clear()
    assert cli_main([*argv, "--threads", "2"]) == 0
    assert {s[1] for s in seen} == {2}  # --threads overrides what was recorded


def test_ship_accepts_the_verified_chain(chain_root, tmp_path, capsys):
    root = _copy(chain_root, tmp_path)
    assert cli_main(["-q", "ship", str(root), "--repo", str(tmp_path / "repo"), "--max-batch-size", "4"]) == 0
    assert any((tmp_path / "repo").rglob("*.onnx"))
    # The same audit after the engine was rebuilt from other options no longer describes it: refused.
    assert cli_main(["-q", "engine", str(root / "onnx"), "--backend", "ort", "--precision", "fp32",
                     "--ort-optimization", "none"]) == 0
    line = _one_error_line(capsys, cli_main(["-q", "ship", str(root), "--repo", str(tmp_path / "repo2")]))
    assert "changed after" in line and "engine" in line

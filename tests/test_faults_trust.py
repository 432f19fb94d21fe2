"""Trust boundaries (issue 25): a folder from elsewhere runs no code and ships nothing ship did not verify.

- ship ties the audit to the engine it ships by manifest hash; --force overrides a verdict, never that
  tie nor the engine's own integrity (items 1 and 3);
- a pruned manifest grants no trust: re-opening a pickle or importing a `module:Class` it records needs
  --trust-pickle / --allow-import on the command line of the stage that does it (export, distill, audit,
  densify --backend torch), and --arch must name an nn.Module subclass before anything is called (item 2).

Hostile edits recompute the manifest's self-hash, as anyone with write access to a folder can.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from own_archs import SmallCNN
from ship_engine import make_engine, use_failed_audit

from faults_helpers import Payload, one_line, run_in_process

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main


class MarkedCNN(SmallCNN):
    """A SmallCNN whose unpickling writes `marker`: shows whether (and when) a stage re-opens the pickle."""

    def __init__(self, marker: Path):
        super().__init__(in_chans=1)
        self.marker = str(marker)

    def __setstate__(self, state):
        super().__setstate__(state)
        Path(state["marker"]).write_text("ran")


def rewrite_manifest(folder: Path, edit) -> None:
    """Apply `edit(manifest)` and recompute the self-hash: a forgery the hash alone cannot catch."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest[artifacts.SELF_HASH] = artifacts._self_hash(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------------
# ship: the audit must be this engine's, by manifest hash (items 1 and 3)


@pytest.fixture(scope="module")
def base_engine(tmp_path_factory) -> Path:
    return make_engine(tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture
def engine(base_engine, tmp_path) -> Path:
    dst = tmp_path / "engines" / "tiny"
    shutil.copytree(base_engine, dst)
    return dst


def _ship(capfd, engine, repo, *extra):
    return run_in_process(capfd, ["ship", str(engine), "--repo", str(repo), *extra])


@pytest.mark.parametrize("force", [False, True])
def test_audit_with_stripped_sources_is_refused(engine, tmp_path, capfd, force):
    rewrite_manifest(engine / "audit", lambda m: m.update(sources={}, inputs={}))
    code, err = _ship(capfd, engine, tmp_path / "repo", *(["--force"] if force else []))
    one_line(code, err, "records no engine and no weights source")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("force", [False, True])
def test_audit_of_another_engine_is_refused(engine, tmp_path, capfd, force):
    # Another engine (a real artifact, passing audit) elsewhere; its audit copied here, its engine source
    # pointing (by a relative path that resolves) at the other engine, self-hash recomputed.
    other = make_engine(tmp_path / "other" / "tiny2")
    shutil.rmtree(engine / "audit")
    shutil.copytree(other / "audit", engine / "audit")
    rel = Path("..", "..", "..", "other", "tiny2", "engine-ort").as_posix()
    rewrite_manifest(engine / "audit", lambda m: m["sources"]["engine"].update(path=rel))
    assert artifacts.read_manifest(engine / "audit", "audit")  # the forgery verifies as an artifact
    code, err = _ship(capfd, engine, tmp_path / "repo", *(["--force"] if force else []))
    one_line(code, err, "audited another engine")
    assert not (tmp_path / "repo").exists()


def test_audit_made_before_the_engine_changed_is_refused(engine, tmp_path, capfd):
    # The engine manifest re-written (honestly re-hashed): the audit recorded the old hash.
    rewrite_manifest(engine / "engine-ort", lambda m: m.update(precision="fp16"))
    code, err = _ship(capfd, engine, tmp_path / "repo", "--force")
    one_line(code, err, "changed after")


@pytest.mark.parametrize("edit", ["file_sha256 deleted", "files updated, self-hash stale"])
def test_force_never_skips_engine_integrity(engine, tmp_path, capfd, edit):
    shutil.rmtree(engine / "audit")  # unaudited: --force is what lets it ship at all
    ed = engine / "engine-ort"
    (ed / "sparse.onnx").write_bytes((ed / "dense.onnx").read_bytes())  # the dense engine posing as sparse
    manifest = json.loads((ed / "manifest.json").read_text())
    if edit == "file_sha256 deleted":
        del manifest["file_sha256"]
    else:
        manifest["files"]["sparse.onnx"] = manifest["file_sha256"]["sparse.onnx"] = artifacts.sha256_file(
            ed / "sparse.onnx")
    (ed / "manifest.json").write_text(json.dumps(manifest))
    code, err = _ship(capfd, engine, tmp_path / "repo", "--force")
    one_line(code, err, str(ed))
    assert not (tmp_path / "repo").exists()


def test_engine_file_without_a_recorded_sha256_is_refused(engine, tmp_path, capfd):
    """An engine manifest recording no sha256 for its file (file_sha256 gone, the manifest honestly re-hashed,
    as an older mpdeploy or a forger writes it): nothing ties the file to the build, so not even --force ships."""
    shutil.rmtree(engine / "audit")  # unaudited: --force is what could let it ship at all
    rewrite_manifest(engine / "engine-ort", lambda m: m.pop("file_sha256"))
    code, err = _ship(capfd, engine, tmp_path / "repo", "--force")
    one_line(code, err, "no sha256 recorded")
    assert not (tmp_path / "repo").exists()


def test_ship_names_the_hashes_it_verified(engine, tmp_path, capfd):
    code = cli_main(["-q", "ship", str(engine), "--repo", str(tmp_path / "repo")])
    out = capfd.readouterr().out
    engine_hash = artifacts.manifest_hash(engine / "engine-ort")
    audit_hash = artifacts.manifest_hash(engine / "audit")
    assert code == 0 and engine_hash in out and audit_hash in out
    provenance = json.loads((tmp_path / "repo" / "tiny" / "1" / "provenance.json").read_text())
    assert provenance["verified"] == {"engine_manifest_sha256": engine_hash, "audit_manifest_sha256": audit_hash}


def test_forced_ship_past_a_failed_audit_still_names_it(engine, tmp_path, capfd):
    use_failed_audit(engine)
    code = cli_main(["-q", "ship", str(engine), "--repo", str(tmp_path / "repo"), "--force"])
    capfd.readouterr()
    provenance = json.loads((tmp_path / "repo" / "tiny" / "1" / "provenance.json").read_text())
    assert code == 0 and provenance["forced"] is True and provenance["audit"]["passed"] is False
    assert provenance["verified"]["audit_manifest_sha256"] == artifacts.manifest_hash(engine / "audit")


# ---------------------------------------------------------------------------------------------------
# a pruned manifest grants no trust (item 2)

PRUNE = ["--input-shape", "1,16,16", "--calib", "synthetic", "--calib-batches", "1"]


@pytest.fixture(scope="module")
def pruned_state_dict(tmp_path_factory) -> Path:
    """pruned/ of a state dict with --arch own_archs:SmallCNN."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    torch.save(SmallCNN(in_chans=1).state_dict(), root / "cnn.pth")
    assert cli_main(["-q", "prune", str(root / "cnn.pth"), "--arch", "own_archs:SmallCNN", "--model-kwargs",
                     "in_chans=1", *PRUNE, "--out", str(root / "pruned")]) == 0
    return root / "pruned"


@pytest.fixture(scope="module")
def pruned_pickle(tmp_path_factory) -> Path:
    """pruned/ of a full pickle, pruned with --trust-pickle."""
    root = tmp_path_factory.mktemp("pickle")
    torch.manual_seed(0)
    torch.save(SmallCNN(in_chans=1).eval(), root / "model.pt")
    assert cli_main(["-q", "prune", str(root / "model.pt"), "--trust-pickle", *PRUNE,
                     "--out", str(root / "pruned")]) == 0
    return root / "pruned"


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pruned"
    shutil.copytree(folder, dst)
    return dst


def test_manifest_recorded_class_is_not_imported_without_a_grant(pruned_state_dict, tmp_path, capfd):
    code, err = run_in_process(capfd, ["export", str(pruned_state_dict), "--out", str(tmp_path / "onnx")])
    one_line(code, err, "own_archs:SmallCNN", "manifest", "--allow-import own_archs:SmallCNN")
    assert not (tmp_path / "onnx").exists()


def test_manifest_recorded_os_system_runs_nothing(pruned_state_dict, tmp_path, capfd):
    marker = tmp_path / "marker"
    pruned = _copy(pruned_state_dict, tmp_path)
    rewrite_manifest(pruned, lambda m: m["model"]["source"].update(name="os:system",
                                                                   kwargs={"command": f"touch {marker}"}))
    code, err = run_in_process(capfd, ["export", str(pruned), "--out", str(tmp_path / "onnx")])
    one_line(code, err, "'os:system'", "manifest", "--allow-import")
    # Even granted, a function is no nn.Module class: refused before anything is called.
    code, err = run_in_process(capfd, ["export", str(pruned), "--allow-import", "os:system", "--out", str(tmp_path / "onnx")])
    one_line(code, err, "not an nn.Module subclass")
    assert not marker.exists()
    assert not (tmp_path / "onnx").exists()


def test_granted_class_exports(pruned_state_dict, tmp_path, capfd):
    code, err = run_in_process(capfd, ["export", str(pruned_state_dict), "--allow-import", "own_archs:SmallCNN",
                             "--out", str(tmp_path / "onnx")])
    assert code == 0, err
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_recorded_pickle_is_not_reopened_without_trust_pickle(pruned_pickle, tmp_path, capfd):
    code, err = run_in_process(capfd, ["export", str(pruned_pickle), "--out", str(tmp_path / "onnx")])
    one_line(code, err, "model.pt", "--trust-pickle", "manifest")
    assert not (tmp_path / "onnx").exists()


def _forged_pickle(pruned_state_dict, tmp_path) -> tuple[Path, Path]:
    """(a copy of the pruned folder whose manifest records a hostile pickle as trusted, its marker file)."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save(Payload(marker), evil)
    pruned = _copy(pruned_state_dict, tmp_path)
    source = {"kind": "pickle", "path": str(evil), "sha256": artifacts.sha256_file(evil), "trust_pickle": True}
    rewrite_manifest(pruned, lambda m: m["model"].update(source=source))
    return pruned, marker


def test_forged_trust_pickle_runs_nothing(pruned_state_dict, tmp_path, capfd):
    pruned, marker = _forged_pickle(pruned_state_dict, tmp_path)
    for command in (["export", str(pruned), "--out", str(tmp_path / "onnx")],
                    ["export", str(pruned), "--allow-import", "own_archs:SmallCNN", "--out", str(tmp_path / "onnx")]):
        code, err = run_in_process(capfd, command)
        one_line(code, err, "evil.pt", "--trust-pickle")
    assert not marker.exists()


def test_arch_must_name_a_module_class_before_anything_is_called(tmp_path, capfd):
    marker = tmp_path / "marker"
    torch.save(SmallCNN(in_chans=1).state_dict(), tmp_path / "cnn.pth")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), "--arch", "os:system", "--model-kwargs",
                             f"command='touch {marker}'", "--input-shape", "1,16,16", "--out", str(tmp_path / "o")])
    one_line(code, err, "not an nn.Module subclass")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# densify: `--backend torch` on a pruned folder re-creates the model (torch's conversion plan is computed
# on it), so it takes the same grants as export; the engine / --trt-log paths read reports only.


def _densify(capfd, pruned, out, *extra):
    return run_in_process(capfd, ["densify", str(pruned), "--backend", "torch", "--out", str(out), *extra])


def test_densify_does_not_import_a_recorded_class_without_a_grant(pruned_state_dict, tmp_path, capfd):
    code, err = _densify(capfd, pruned_state_dict, tmp_path / "dense")
    one_line(code, err, "own_archs:SmallCNN", "manifest", "--allow-import own_archs:SmallCNN")
    assert not (tmp_path / "dense").exists()
    code, err = _densify(capfd, pruned_state_dict, tmp_path / "dense", "--allow-import", "own_archs:SmallCNN")
    assert code == 0, err


def test_densify_of_a_forged_pickle_runs_nothing(pruned_state_dict, tmp_path, capfd):
    pruned, marker = _forged_pickle(pruned_state_dict, tmp_path)
    code, err = _densify(capfd, pruned, tmp_path / "dense", "--allow-import", "own_archs:SmallCNN")
    one_line(code, err, "evil.pt", "--trust-pickle")
    assert not marker.exists()
    assert not (tmp_path / "dense").exists()


BUILD = ["--input-shape", "1,16,16", "--sparse", "--backend", "ort", "--calib", "synthetic", "--calib-batches", "1",
         "--eval-data", "synthetic", "--max-eval-images", "16", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
         "--no-plots", "--sensitivity-batch", "0"]


@pytest.fixture(scope="module")
def marked_chain(tmp_path_factory) -> tuple[Path, Path]:
    """(engines/<name> built with --trust-pickle from a real pickle whose loading writes a marker, the marker).
    The marker is removed once the build made it; a test that writes it removes it again."""
    root = tmp_path_factory.mktemp("marked")
    marker = root / "marker"
    torch.manual_seed(0)
    torch.save(MarkedCNN(marker).eval(), root / "model.pt")
    assert cli_main(["-q", "build", str(root / "model.pt"), "--trust-pickle", *BUILD, "--out", str(root / "cnn")]) == 0
    assert marker.exists()  # the build opened it, as granted: the marker is real
    marker.unlink()
    return root / "cnn", marker


def test_densify_runs_model_code_only_for_the_torch_plan_and_only_granted(marked_chain, tmp_path, capfd):
    # densify of the onnx/ with a TensorRT log reads reports and tensors only: no grant needed, nothing
    # runs. `--backend torch` re-creates the model: refused without --trust-pickle (nothing runs), and
    # with it the pickle is re-opened.
    chain, marker = marked_chain
    capfd.readouterr()
    consumers = [t["consumer"] for t in json.loads((chain / "onnx" / "sparsity.json").read_text())["tensors"]
                 if t["runs_sparse"]]
    assert consumers
    (tmp_path / "build.log").write_text(
        f"[V] (Sparsity) Layers eligible for sparse math: {', '.join(consumers)}\n"
        f"[V] (Sparsity) TRT inference plan picked sparse implementation for layers: {', '.join(consumers[1:])}\n")
    code, err = run_in_process(capfd, ["densify", str(chain / "onnx"), "--trt-log", str(tmp_path / "build.log"),
                                       "--out", str(tmp_path / "from-log")])
    assert code == 0 and not err, err
    assert (tmp_path / "from-log" / "manifest.json").is_file()
    assert not marker.exists()

    code, err = _densify(capfd, chain / "pruned", tmp_path / "from-plan")
    one_line(code, err, "model.pt", "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "from-plan").exists()
    code, err = _densify(capfd, chain / "pruned", tmp_path / "from-plan", "--trust-pickle")
    assert code == 0, err
    assert marker.exists()
    marker.unlink()


AUDIT = ["--backend", "ort", "--data", "synthetic", "--max-eval-images", "16", "--batch-sizes", "1", "--warmup", "0",
         "--repeats", "1", "--no-plots"]


@pytest.mark.parametrize("stage", ["distill", "audit"])
def test_later_stages_reopen_a_recorded_pickle_only_when_granted(marked_chain, tmp_path, capfd, stage):
    chain, marker = marked_chain
    capfd.readouterr()
    if stage == "distill":
        argv = ["distill", str(chain / "pruned"), "--data", "synthetic", "--epochs", "1", "--device", "cpu",
                "--out", str(tmp_path / "distilled")]
        made = tmp_path / "distilled"
    else:  # the per-layer sensitivity map is computed on the rebuilt PyTorch model
        shutil.copytree(chain, tmp_path / "cnn", ignore=shutil.ignore_patterns("audit"))
        argv = ["audit", str(tmp_path / "cnn"), *AUDIT, "--sensitivity-batch", "8"]
        made = tmp_path / "cnn" / "audit"
    code, err = run_in_process(capfd, argv)
    one_line(code, err, "model.pt", "--trust-pickle", "manifest")
    assert not marker.exists() and not made.exists()
    code, err = run_in_process(capfd, [*argv, "--trust-pickle"])
    assert code == 0, err
    assert marker.exists() and made.is_dir()
    marker.unlink()

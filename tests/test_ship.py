"""mpdeploy ship: Triton model repositories, checked with Triton's own config protobuf and a real server.

The server test runs the `tritonserver` binary carried by nvidia-pytriton (Python backend only) on
127.0.0.1 and compares its answers with ONNX Runtime run here on the same ONNX file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpdeploy.core.errors import MpdeployError
from mpdeploy.serve.ship import ShipConfig, ship
from mpdeploy.serve.triton_config import parse_config

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from ship_engine import (  # noqa: E402
    INPUT_SHAPE,
    NUM_CLASSES,
    make_engine,
    sha256,
    use_failed_audit,
    write_standin_trt_engine,
)
from tritonclient.grpc import model_config_pb2 as pb2  # noqa: E402

TEMPLATE = Path(__file__).resolve().parents[1] / "mpdeploy" / "serve" / "triton_python_model.py"


# ---------------------------------------------------------------------------------------------------
# fixture engine directory: a real chain (tests/ship_engine.py)


_sha = sha256
IO = ([("input", "TYPE_FP32", list(INPUT_SHAPE))], [("logits", "TYPE_FP32", [NUM_CLASSES])])


@pytest.fixture(scope="module")
def base_engine(tmp_path_factory) -> Path:
    """engines/tiny: pruned/, onnx/, engine-ort/{sparse,dense}.onnx and a passed audit, made by mpdeploy."""
    return make_engine(tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture
def engine(base_engine, tmp_path) -> Path:
    """A private copy of the fixture engine that a test may alter."""
    dst = tmp_path / "engines" / "tiny"
    shutil.copytree(base_engine, dst)
    return dst


def _trt_engine(base_engine: Path, tmp_path: Path) -> Path:
    """The chain with a dense-only TensorRT engine (a stand-in plan: only its bytes are shipped) instead of
    its ort engine and audit; unaudited (no TensorRT here to audit it)."""
    root = tmp_path / "engines" / "tinytrt"
    shutil.copytree(base_engine, root, ignore=shutil.ignore_patterns("audit"))
    write_standin_trt_engine(root)
    shutil.rmtree(root / "engine-ort")
    return root


def _snapshot(path: Path) -> dict[str, str]:
    """Recursive listing with content hashes: equal snapshots mean nothing changed."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": _sha(path)}
    return {
        str(p.relative_to(path)): ("dir" if p.is_dir() else _sha(p)) for p in sorted(path.rglob("*"))
    }


def _config(repo: Path, name: str = "tiny"):
    cfg = parse_config((repo / name / "config.pbtxt").read_text())
    assert isinstance(cfg, pb2.ModelConfig)
    return cfg


def _io(cfg):
    return (
        [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input],
        [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output],
    )


# ---------------------------------------------------------------------------------------------------
# configs and repository layout


def test_ship_onnxruntime_platform(engine, tmp_path):
    repo = tmp_path / "repo"
    vdir = ship(engine, ShipConfig(repo=repo))
    assert vdir == repo / "tiny" / "1"
    cfg = _config(repo)
    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == ("tiny", "onnxruntime_onnx", "", 8)
    assert _io(cfg) == IO
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(1, "KIND_CPU")]
    assert sorted(p.name for p in vdir.iterdir()) == ["SHA256SUMS", "model.onnx", "provenance.json"]
    assert (vdir / "model.onnx").read_bytes() == (engine / "engine-ort" / "sparse.onnx").read_bytes()

    prov = json.loads((vdir / "provenance.json").read_text())
    audit = json.loads((engine / "audit" / "audit.json").read_text())
    assert prov["audit"]["passed"] is True and prov["audit"]["summary"] == audit["summary"]
    assert set(prov["sources"]) == {"onnx", "weights"}
    assert prov["verified"] == {"engine_manifest_sha256": _sha(engine / "engine-ort" / "manifest.json"),
                                "audit_manifest_sha256": _sha(engine / "audit" / "manifest.json")}
    assert prov["engine_manifest"]["backend"] == "ort" and prov["variant"] == "sparse"
    assert prov["mpdeploy_version"] and prov["created_utc"].endswith("+00:00")
    assert prov["config_sha256"] == _sha(repo / "tiny" / "config.pbtxt")

    sums = dict(line.split("  ")[::-1] for line in (vdir / "SHA256SUMS").read_text().splitlines())
    assert sums == {"model.onnx": _sha(vdir / "model.onnx"), "provenance.json": _sha(vdir / "provenance.json")}
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=vdir, check=True)
    assert not [p for p in repo.rglob("*") if ".tmp-" in p.name]


def test_ship_python_backend_config(engine, tmp_path):
    repo = tmp_path / "repo"
    vdir = ship(engine, ShipConfig(repo=repo, serve_backend="python", variant="dense", max_batch_size=4))
    cfg = _config(repo)
    assert (cfg.backend, cfg.platform, cfg.max_batch_size) == ("python", "", 4)
    assert cfg.parameters["EXECUTION_ENV_PATH"].string_value == str(Path(sys.prefix).resolve())
    assert _io(cfg) == IO
    assert sorted(p.name for p in vdir.iterdir()) == ["SHA256SUMS", "model.onnx", "model.py", "provenance.json"]
    assert (vdir / "model.py").read_bytes() == TEMPLATE.read_bytes()
    assert (vdir / "model.onnx").read_bytes() == (engine / "engine-ort" / "dense.onnx").read_bytes()


def test_ship_no_batching_keeps_full_shape(engine, tmp_path):
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo, max_batch_size=0, instance_count=2))
    cfg = _config(repo)
    assert _io(cfg) == ([("input", "TYPE_FP32", [-1, *INPUT_SHAPE])], [("logits", "TYPE_FP32", [-1, NUM_CLASSES])])
    assert not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].count == 2


def test_ship_tensorrt_plan(base_engine, tmp_path):
    eng = _trt_engine(base_engine, tmp_path)
    repo = tmp_path / "repo"
    with pytest.raises(MpdeployError, match="no audit.*--force"):
        ship(eng, ShipConfig(repo=repo, variant="dense"))
    with pytest.raises(MpdeployError, match="no sparse engine.*--variant"):
        ship(eng, ShipConfig(repo=repo, force=True))  # dense-only build
    with pytest.raises(MpdeployError, match="python"):
        ship(eng, ShipConfig(repo=repo, variant="dense", serve_backend="python", force=True))
    assert not repo.exists()
    vdir = ship(eng, ShipConfig(repo=repo, variant="dense", name="resnet", force=True))
    cfg = _config(repo, "resnet")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("resnet", "tensorrt_plan", 8)
    assert _io(cfg) == ([("input", "TYPE_FP32", list(INPUT_SHAPE))], [("logits", "TYPE_FP32", [NUM_CLASSES])])
    assert pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_GPU"
    assert (vdir / "model.plan").read_bytes() == (eng / "engine-trt" / "dense.plan").read_bytes()
    prov = json.loads((vdir / "provenance.json").read_text())
    assert prov["built_for"]["gpu"] == "NVIDIA H100 80GB HBM3" and prov["built_for"]["tensorrt_version"] == "10.9.0"


def test_versions_share_one_config(engine, tmp_path):
    repo = tmp_path / "repo"
    assert ship(engine, ShipConfig(repo=repo)).name == "1"
    config_before = (repo / "tiny" / "config.pbtxt").read_bytes()
    assert ship(engine, ShipConfig(repo=repo, variant="dense")).name == "2"
    assert ship(engine, ShipConfig(repo=repo, version=7)).name == "7"
    assert (repo / "tiny" / "config.pbtxt").read_bytes() == config_before
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2", "7", "config.pbtxt"]


def test_engine_backend_choice(engine, tmp_path):
    write_standin_trt_engine(engine)
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))  # the audit names ort
    assert _config(repo).platform == "onnxruntime_onnx"
    with pytest.raises(MpdeployError, match="audit .* is for engine-ort.*--force"):
        ship(engine, ShipConfig(repo=repo, name="t_trt", engine_backend="trt", variant="dense"))
    shutil.rmtree(engine / "audit")
    with pytest.raises(MpdeployError, match="--engine-backend"):
        ship(engine, ShipConfig(repo=repo, name="t2", force=True))
    (engine / "engine-torch").mkdir()
    with pytest.raises(MpdeployError, match="ort or trt"):
        ship(engine, ShipConfig(repo=repo, name="t3", engine_backend="torch", force=True))
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]


# ---------------------------------------------------------------------------------------------------
# refusals: each leaves the repository exactly as it was


def test_existing_version_is_never_overwritten(engine, tmp_path):
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))
    before = _snapshot(repo)
    for force in (False, True):
        with pytest.raises(MpdeployError, match="already exists"):
            ship(engine, ShipConfig(repo=repo, version=1, variant="dense", force=force))
        assert _snapshot(repo) == before


def test_different_config_needs_force(engine, tmp_path):
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))
    before = _snapshot(repo)
    with pytest.raises(MpdeployError, match="different config.*--force"):
        ship(engine, ShipConfig(repo=repo, max_batch_size=4))
    assert _snapshot(repo) == before
    ship(engine, ShipConfig(repo=repo, max_batch_size=4, force=True))
    assert _config(repo).max_batch_size == 4
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2", "config.pbtxt"]


def test_engine_without_audit_needs_force(engine, tmp_path):
    shutil.rmtree(engine / "audit")
    repo = tmp_path / "repo"
    with pytest.raises(MpdeployError, match="no audit.*--force"):
        ship(engine, ShipConfig(repo=repo))
    assert not repo.exists()
    vdir = ship(engine, ShipConfig(repo=repo, force=True))
    prov = json.loads((vdir / "provenance.json").read_text())
    assert prov["forced"] is True and prov["audit"] is None


def test_failed_audit_needs_force(engine, tmp_path):
    use_failed_audit(engine)  # a real audit of this engine, failed by an impossible speed gate
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "other").mkdir()
    before = _snapshot(repo)
    with pytest.raises(MpdeployError, match=r"audit .* failed \(speedup at batch 4 is .* < required 1000x\).*--force"):
        ship(engine, ShipConfig(repo=repo))
    assert _snapshot(repo) == before
    vdir = ship(engine, ShipConfig(repo=repo, force=True))
    assert json.loads((vdir / "provenance.json").read_text())["audit"]["passed"] is False


def test_repo_that_is_a_file(engine, tmp_path):
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    with pytest.raises(MpdeployError, match="is a file"):
        ship(engine, ShipConfig(repo=repo))
    assert repo.read_text() == "not a folder"


def test_tampered_engine_file(engine, tmp_path):
    with open(engine / "engine-ort" / "sparse.onnx", "ab") as f:
        f.write(b"\0")
    for force in (False, True):  # --force overrides a verdict, never integrity
        with pytest.raises(MpdeployError, match="sparse.onnx does not match"):
            ship(engine, ShipConfig(repo=tmp_path / "repo", force=force))
    assert not (tmp_path / "repo").exists()


def test_failure_while_writing_leaves_repo_unchanged(engine, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))
    before = _snapshot(repo)

    def broken_copy(src, dst, *a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("mpdeploy.serve.ship.shutil.copyfile", broken_copy)
        with pytest.raises(MpdeployError, match="No space left on device"):
            ship(engine, ShipConfig(repo=repo, force=True, max_batch_size=2))  # new version and a new config
        assert _snapshot(repo) == before
        fresh = tmp_path / "fresh" / "repo"
        with pytest.raises(MpdeployError, match="No space left on device"):
            ship(engine, ShipConfig(repo=fresh))
        assert not (tmp_path / "fresh").exists()

    # the last step (replacing config.pbtxt) fails after the version folder was renamed into place
    with monkeypatch.context() as m:
        m.setattr("mpdeploy.serve.ship.os.replace", broken_copy)
        with pytest.raises(MpdeployError, match="nothing was changed"):
            ship(engine, ShipConfig(repo=repo, force=True, max_batch_size=2))
    assert _snapshot(repo) == before


# ---------------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def run_cli(monkeypatch):
    """`mpdeploy ship ...` through the lead's `mpdeploy.cli.main`, else through this command's own parser."""
    if importlib.util.find_spec("mpdeploy.cli") is None:
        from mpdeploy.commands import ship as command

        def run(argv: list[str]) -> int:
            parser = argparse.ArgumentParser(prog="mpdeploy ship")
            command.add_arguments(parser)
            try:
                return command.main(parser.parse_args(argv[1:]))
            except MpdeployError as exc:  # what the CLI does with it
                print(f"error: {exc}", file=sys.stderr)
                return exc.exit_code

        return run
    from mpdeploy import cli

    if "ship" in getattr(cli, "COMMANDS", {}):
        # Only this command's parser: the test must not depend on the other stages' modules.
        monkeypatch.setattr(cli, "COMMANDS", {"ship": cli.COMMANDS["ship"]})
    # The CLI configures root logging onto the (captured) stderr; put it back for later tests.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    return cli.main


def test_cli(engine, tmp_path, capsys, run_cli):
    repo = tmp_path / "repo"
    assert run_cli(["ship", str(engine), "--repo", str(repo), "--max-batch-size", "4"]) == 0
    engine_hash, audit_hash = _sha(engine / "engine-ort" / "manifest.json"), _sha(engine / "audit" / "manifest.json")
    assert capsys.readouterr().out.strip() == (f"{repo / 'tiny' / '1'}: verified engine manifest sha256 {engine_hash}, "
                                               f"audit manifest sha256 {audit_hash}")
    assert _config(repo).max_batch_size == 4

    bad = [
        (["--version", "1", "--max-batch-size", "4"], "already exists"),
        (["--name", "t2", "--repo", str(engine / "engine-ort" / "manifest.json")], "is a file"),
    ]
    for extra, message in bad:
        argv = ["ship", str(engine), "--repo", str(repo), *extra]
        assert run_cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    use_failed_audit(engine)
    assert run_cli(["ship", str(engine), "--repo", str(repo), "--max-batch-size", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert run_cli(["ship", str(engine), "--repo", str(repo), "--max-batch-size", "4", "--force"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"{repo / 'tiny' / '2'}: verified engine manifest sha256 {engine_hash}") and audit_hash not in out


# ---------------------------------------------------------------------------------------------------
# a real Triton server (nvidia-pytriton's tritonserver, Python backend, CPU, loopback only)


def _triton_install():
    from mpdeploy.serve.triton_server import locate_tritonserver

    try:
        return locate_tritonserver()
    except MpdeployError as exc:
        pytest.skip(f"no tritonserver binary ({exc})")


@pytest.mark.triton
def test_served_by_real_triton(engine, tmp_path):
    install = _triton_install()
    httpclient = pytest.importorskip("tritonclient.http")
    from mpdeploy.serve.triton_server import run_tritonserver

    repo = tmp_path / "repo"
    vdir = ship(engine, ShipConfig(repo=repo, serve_backend="python"))
    # The onnxruntime_onnx variant is only checked as a config: the pytriton binary has no
    # onnxruntime backend, so it cannot be served here (a full Triton install would serve it).
    ship(engine, ShipConfig(repo=tmp_path / "ort_repo", name="tiny"))
    assert _config(tmp_path / "ort_repo").platform == "onnxruntime_onnx"

    sparse = ort.InferenceSession(str(engine / "engine-ort" / "sparse.onnx"), providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(str(engine / "engine-ort" / "dense.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    before = _snapshot(repo)
    with run_tritonserver(repo, timeout=90, install=install, log_path=tmp_path / "tritonserver.log") as server:
        client = httpclient.InferenceServerClient(server.url, connection_timeout=10, network_timeout=30)
        try:
            served_cfg = client.get_model_config("tiny")
            assert served_cfg["max_batch_size"] == 8 and served_cfg["backend"] == "python"
            for batch in (1, 4, 1):
                x = rng.standard_normal((batch, *INPUT_SHAPE), dtype=np.float32)
                inp = httpclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                got = client.infer("tiny", [inp], model_version="1", headers=server.http_headers).as_numpy("logits")
                want = sparse.run(["logits"], {"input": x})[0]
                assert got.shape == (batch, NUM_CLASSES) and got.dtype == np.float32
                assert np.abs(got - want).max() < 1e-5
                # the sparse engine was shipped, not its dense twin
                assert np.abs(got - dense.run(["logits"], {"input": x})[0]).max() > 1e-3
        finally:
            client.close()  # an open connection would hold the server's shutdown for its exit timeout
    assert server.process.poll() is not None
    # Serving changed nothing shipped. The stub's embedded Python writes model.py's __pycache__/ next to
    # it (it ignores PYTHONDONTWRITEBYTECODE); harmless: SHA256SUMS lists only the shipped files.
    assert {k: v for k, v in _snapshot(repo).items() if "__pycache__" not in k} == before
    assert (vdir / "model.py").exists()


@pytest.mark.triton
def test_server_reports_a_model_it_cannot_load(engine, tmp_path):
    install = _triton_install()
    from mpdeploy.serve.triton_server import run_tritonserver

    repo = tmp_path / "repo"
    ship(engine, ShipConfig(repo=repo))  # onnxruntime_onnx: no such backend in the pytriton binary
    with pytest.raises(MpdeployError, match="onnxruntime"):
        with run_tritonserver(repo, timeout=60, install=install):
            pass

"""Hostile or broken inputs (issue 25, items 4-7): one line and exit 2, never a traceback or a silent loss.

- a traced TorchScript program lifts as many layers as the scripted save of the same model;
- a huge declared shape over HTTP never reaches the Triton server mpdeploy launches (it stays up);
- model kwargs timm rejects, broken --arch modules and classes, unreadable model files: one line;
- NaN pixels and labels out of range are refused before any work, the same way in every stage.
"""

from __future__ import annotations

import builtins
import json
import sys

import numpy as np
import pytest
import torch
from own_archs import SmallCNN, SmallViT

from faults_helpers import one_line, run_in_process

from mpdeploy.cli import main as cli_main




# ---------------------------------------------------------------------------------------------------
# item 4: traced TorchScript


@pytest.mark.parametrize("arch,channels", [(SmallCNN, 1), (SmallViT, 3)])
def test_traced_torchscript_lifts_like_scripted(tmp_path, arch, channels):
    from mpdeploy.models.programs import torchscript_module

    torch.manual_seed(0)
    model = arch(in_chans=channels).eval()
    x = torch.randn(2, channels, 16, 16)
    counts = {}
    for how, program in (("script", torch.jit.script(model)), ("trace", torch.jit.trace(model, x))):
        torch.jit.save(program, tmp_path / f"{how}.pt")
        module = torchscript_module(torch.jit.load(str(tmp_path / f"{how}.pt")), (channels, 16, 16), how)
        counts[how] = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
    expected = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert counts == {"script": expected, "trace": expected}


def test_unliftable_ops_are_refused_with_a_count(tmp_path, capfd):
    class SharedWeight(torch.nn.Module):
        """One Linear's weight used twice: no single layer owns it, so it cannot be lifted."""

        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            y = self.stem(x).mean(dim=(2, 3))
            return torch.nn.functional.linear(self.fc(y), self.fc.weight)

    torch.jit.save(torch.jit.trace(SharedWeight().eval(), torch.randn(2, 1, 16, 16)), tmp_path / "shared.pt")
    code, err = run_in_process(capfd, ["analyze", str(tmp_path / "shared.pt"), "--trust-pickle", "--input-shape", "1,16,16",
                             "--out", str(tmp_path / "out")])
    one_line(code, err, "2 of 3 conv / linear ops", "could not be lifted")


# ---------------------------------------------------------------------------------------------------
# item 5: the Triton server mpdeploy launches survives a huge declared shape over HTTP


def test_huge_json_shape_never_reaches_triton(tmp_path):
    import http.client

    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from ship_engine import INPUT_SHAPE, make_engine

    from mpdeploy.core.errors import MpdeployError
    from mpdeploy.serve.ship import ShipConfig, ship
    from mpdeploy.serve.triton_config import LIMIT_PARAMETER, parse_config
    from mpdeploy.serve.triton_server import HTTP_INFER_HEADER, locate_tritonserver, run_tritonserver

    try:
        install = locate_tritonserver()
    except MpdeployError as exc:
        pytest.skip(f"no tritonserver binary ({exc})")
    engine = make_engine(tmp_path / "engines" / "tiny")
    ship(engine, ShipConfig(repo=tmp_path / "repo", serve_backend="python"))
    cfg = parse_config((tmp_path / "repo" / "tiny" / "config.pbtxt").read_text())
    limit = 8 * int(np.prod(INPUT_SHAPE))
    assert cfg.parameters[LIMIT_PARAMETER].string_value == str(limit)  # the limit, stated in the config

    def post(url: str, shape, data, headers) -> tuple[int, str]:
        host, port = url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]})
        try:
            conn.request("POST", "/v2/models/tiny/infer", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    with run_tritonserver(tmp_path / "repo", timeout=120, install=install, log_path=tmp_path / "log") as server:
        # Whatever key a client holds or guesses, the request is refused before Triton's parser sees it.
        for headers in ({}, server.http_headers, {HTTP_INFER_HEADER: "guessed"}):
            status, body = post(server.url, [8, 1, 32_000_000, 32_000_000], [0.0], headers)
            assert status == 400 and f"takes at most {limit}" in body, body
        status, body = post(server.url, [1, *INPUT_SHAPE], [0.5] * int(np.prod(INPUT_SHAPE)), {})
        assert status == 200, body
        assert server.process.poll() is None


# ---------------------------------------------------------------------------------------------------
# item 6: one line instead of a traceback


@pytest.mark.parametrize("kwargs,needle", [
    ("foo=1", "unexpected keyword argument 'foo'"),
    ("in_chans=-3", "negative dimension"),
    ("drop_rate='x'", "--model-kwargs"),
])
def test_model_kwargs_timm_rejects(tmp_path, capfd, kwargs, needle):
    code, err = run_in_process(capfd, ["prune", "timm:resnet10t", "--weights", "random", "--model-kwargs", kwargs,
                             "--out", str(tmp_path / "o")])
    one_line(code, err, needle, "--model-kwargs")
    assert not (tmp_path / "o").exists()


def test_absurd_width_is_refused_before_it_is_allocated(tmp_path, capfd):
    code, err = run_in_process(capfd, ["prune", "timm:vit_tiny_patch16_224", "--weights", "random", "--model-kwargs",
                             "embed_dim=192000,num_heads=3", "--out", str(tmp_path / "o")])
    one_line(code, err, "parameters (limit")


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Two modules on sys.path: one whose import raises, one whose class raises in __init__."""
    (tmp_path / "broken_import.py").write_text("raise RuntimeError('this module is broken')\n")
    (tmp_path / "broken_init.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        raise ValueError('bad width')\n"
        "NOT_A_CLASS = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("broken_import", "broken_init"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("arch,needle", [
    (":Net", "must be module:Class"),
    ("broken_import:Net", "RuntimeError: this module is broken"),
    ("broken_init:Net", "ValueError: bad width"),
    ("broken_init:NOT_A_CLASS", "not an nn.Module subclass"),
])
def test_broken_arch(tmp_path, capfd, user_modules, arch, needle):
    torch.save(SmallCNN(in_chans=1).state_dict(), tmp_path / "cnn.pth")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), "--arch", arch, "--input-shape", "1,16,16",
                             "--out", str(tmp_path / "o")])
    one_line(code, err, needle)


def test_unreadable_model_file(tmp_path, capfd, monkeypatch):
    path = tmp_path / "cnn.pth"
    torch.save(SmallCNN(in_chans=1).state_dict(), path)
    real_open = builtins.open

    # Root reads any file, so the other user's unreadable file is simulated at the open call.
    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    code, err = run_in_process(capfd, ["prune", str(path), "--arch", "own_archs:SmallCNN", "--input-shape", "1,16,16"])
    one_line(code, err, "permission denied", str(path))


# ---------------------------------------------------------------------------------------------------
# items 6 and 7: data no stage can use is refused up front, the same way everywhere


def _npz(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return str(path)


def _images(n=16, channels=1):
    return np.random.default_rng(0).standard_normal((n, channels, 16, 16)).astype(np.float32)


def test_nan_images_are_refused_for_calibration(tmp_path, capfd):
    images = _images()
    images[3, 0, 2, 2] = np.nan
    data = _npz(tmp_path / "nan.npz", images, np.arange(16) % 10)
    torch.save(SmallCNN(in_chans=1).state_dict(), tmp_path / "cnn.pth")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), "--arch", "own_archs:SmallCNN", "--input-shape",
                             "1,16,16", "--calib", data, "--out", str(tmp_path / "o")])
    one_line(code, err, "1 of 16 images hold NaN")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    torch.save(SmallCNN(in_chans=1).state_dict(), root / "cnn.pth")
    assert cli_main(["-q", "prune", str(root / "cnn.pth"), "--arch", "own_archs:SmallCNN", "--input-shape", "1,16,16",
                     "--calib", "synthetic", "--calib-batches", "1", "--out", str(root / "pruned")]) == 0
    return root / "pruned"


@pytest.mark.parametrize("stage", ["distill", "export-int8"])
def test_nan_images_are_refused_by_later_stages(pruned_cnn, tmp_path, capfd, stage):
    images = _images()
    images[0, 0, 0, 0] = np.inf
    data = _npz(tmp_path / "nan.npz", images, np.arange(16) % 10)
    if stage == "distill":
        argv = ["distill", str(pruned_cnn), "--allow-import", "own_archs:SmallCNN", "--data", data, "--epochs", "1",
                "--device", "cpu", "--out", str(tmp_path / "o")]
    else:
        argv = ["export", str(pruned_cnn), "--allow-import", "own_archs:SmallCNN", "--precision", "int8",
                "--calib", data, "--out", str(tmp_path / "o")]
    code, err = run_in_process(capfd, argv)
    one_line(code, err, "hold NaN or infinite values")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("labels,needle", [
    (np.arange(16) % 10 - 1, "labels range -1..8"),
    (np.arange(16) + 5, "labels up to 20"),
])
def test_labels_out_of_range_in_audit_are_refused(tmp_path, capfd, labels, needle):
    from ship_engine import INPUT_SHAPE, make_engine

    engine = make_engine(tmp_path / "engines" / "tiny")  # 1,16,16 input, 10 classes
    data = _npz(tmp_path / "bad.npz", _images(channels=INPUT_SHAPE[0]), labels)
    before = sorted(p.name for p in engine.iterdir())
    code, err = run_in_process(capfd, ["audit", str(engine), "--data", data, "--backend", "ort", "--repeats", "1",
                             "--warmup", "0", "--no-plots", "--no-sensitivity"])
    one_line(code, err, needle)
    assert sorted(p.name for p in engine.iterdir()) == before

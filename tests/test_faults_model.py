"""Bad model files, bad data and hostile inputs: exit 2, one stderr line naming the fix, no traceback.

The security cases plant a payload that writes a marker file when unpickled, in each format a user
can hand over (full pickle, state dict, TorchScript, torch.export .pt2). Without --trust-pickle the
marker must never appear. Where torch would run the payload, the trusted run shows it does (so the
test is able to fail).
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from own_archs import SmallCNN, SmallViT
from PIL import Image

from faults_helpers import Payload, one_line, run_in_process






# ---------------------------------------------------------------------------------------------------
# security: no code from a model file runs without --trust-pickle


def _pickle_file(tmp_path, marker):
    torch.save(Payload(marker), tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


def _state_dict_file(tmp_path, marker):
    torch.save({"fc.weight": torch.zeros(10, 32), "extra": Payload(marker)}, tmp_path / "evil.pth")
    return tmp_path / "evil.pth"


def _torchscript_file(tmp_path, marker):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(SmallCNN()), buffer)
    src = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    path = tmp_path / "evil.ts.pt"
    with zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl"):
                data = _pickle_bytes(Payload(marker))
            dst.writestr(name, data)
    return path


def _pickle_bytes(obj) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=2)


def _pt2_file(tmp_path, marker):
    """A real .pt2 with one weight replaced by a pickled payload flagged use_pickle."""
    model = SmallCNN().eval()
    program = torch.export.export(model, (torch.randn(2, 1, 16, 16),))
    clean = tmp_path / "clean.pt2"
    torch.export.save(program, clean)
    path = tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(src.read(config_name))
        entry = config["config"]["stem.weight"]
        entry["use_pickle"] = True
        target = config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]
        for name in src.namelist():
            data = src.read(name)
            if name == config_name:
                data = json.dumps(config).encode()
            elif name == target:
                data = payload.getvalue()
            dst.writestr(name, data)
    return path


MALICIOUS = {"pickle": _pickle_file, "state_dict": _state_dict_file, "torchscript": _torchscript_file,
             "pt2": _pt2_file}


@pytest.mark.parametrize("fmt", sorted(MALICIOUS))
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_malicious_file_runs_nothing_without_trust(tmp_path, capfd, fmt, command):
    marker = tmp_path / "marker"
    path = MALICIOUS[fmt](tmp_path, marker)
    code, err = run_in_process(capfd, [command, str(path), "--input-shape", "1,16,16", "--out", str(tmp_path / "out")])
    one_line(code, err, "--trust-pickle")
    assert not marker.exists(), f"{fmt}: code from the file ran without --trust-pickle"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["pickle", "state_dict", "pt2"])
def test_payloads_are_real(tmp_path, capfd, fmt):
    # With the flag, torch does run these payloads: the refusal above is what stops them.
    marker = tmp_path / "marker"
    path = MALICIOUS[fmt](tmp_path, marker)
    code, err = run_in_process(capfd, ["analyze", str(path), "--trust-pickle", "--input-shape", "1,16,16",
                             "--out", str(tmp_path / "out")])
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert marker.exists()


def test_model_kwargs_are_never_evaluated(tmp_path, capfd):
    marker = tmp_path / "marker"
    hostile = f"in_chans=__import__('os').system('touch {marker}')"
    code, err = run_in_process(capfd, ["prune", "timm:resnet10t", "--weights", "random", "--model-kwargs", hostile])
    one_line(code, err, "--model-kwargs")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# damaged files: "not a readable checkpoint", never a push towards --trust-pickle


def _good_pt2(tmp_path) -> bytes:
    program = torch.export.export(SmallCNN().eval(), (torch.randn(2, 1, 16, 16),))
    torch.export.save(program, tmp_path / "good.pt2")
    return (tmp_path / "good.pt2").read_bytes()


@pytest.mark.parametrize("name,make", [
    ("random.pth", lambda tmp: os.urandom(4096)),
    ("random.pt", lambda tmp: b"\x00garbage" * 300),
    ("random.pt2", lambda tmp: os.urandom(4096)),
    ("truncated.pt2", lambda tmp: _good_pt2(tmp)[:3000]),
    ("cut_end.pt2", lambda tmp: _good_pt2(tmp)[:-200]),
])
def test_damaged_model_file(tmp_path, capfd, name, make):
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    code, err = run_in_process(capfd, ["prune", str(path), "--input-shape", "1,16,16", "--trust-pickle",
                             "--out", str(tmp_path / "out")])
    one_line(code, err, "not a readable checkpoint")
    code, err = run_in_process(capfd, ["prune", str(path), "--input-shape", "1,16,16", "--out", str(tmp_path / "out")])
    one_line(code, err, "not a readable checkpoint")
    assert "--trust-pickle only" not in err[0]


# ---------------------------------------------------------------------------------------------------
# shapes and channels that do not fit the model: one line before any work


def _cnn_state(tmp_path, channels=1):
    torch.save(SmallCNN(in_chans=channels).state_dict(), tmp_path / "cnn.pth")
    return ["--arch", "own_archs:SmallCNN", "--model-kwargs", f"in_chans={channels}"]


def test_input_channels_do_not_fit(tmp_path, capfd):
    arch = _cnn_state(tmp_path)
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), *arch, "--input-shape", "3,32,32",
                             "--out", str(tmp_path / "o")])
    one_line(code, err, "does not fit", "--input-shape")
    code, err = run_in_process(capfd, ["prune", "timm:resnet10t", "--weights", "random", "--model-kwargs", "in_chans=1",
                             "--input-shape", "3,176,176", "--out", str(tmp_path / "o")])
    one_line(code, err, "does not fit")
    assert not (tmp_path / "o").exists()


def test_timm_in_chans_gives_the_input_shape(tmp_path, capfd):
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.commands.arguments import parse_model_kwargs
    from mpdeploy.models.load import load_model

    loaded = load_model(ModelSpec("timm:resnet10t", weights="random", model_kwargs=parse_model_kwargs("in_chans=1")))
    assert loaded.input_shape[0] == 1


def test_huge_input_shape(tmp_path, capfd):
    code, err = run_in_process(capfd, ["prune", "timm:resnet10t", "--weights", "random", "--input-shape", "1,20000,20000"])
    one_line(code, err, "too large")


def test_unknown_model_kwarg(tmp_path, capfd):
    arch = ["--arch", "own_archs:SmallCNN", "--model-kwargs", "in_chans=1,depth=7"]
    torch.save(SmallCNN().state_dict(), tmp_path / "cnn.pth")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), *arch, "--input-shape", "1,16,16"])
    one_line(code, err, "--model-kwargs")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), "--arch", "no_such_module:Net", "--input-shape",
                             "1,16,16"])
    one_line(code, err, "cannot import --arch")


@pytest.mark.parametrize("images,labels,needle", [
    (np.zeros((4, 3, 16, 16), np.float32), None, "holds images of shape 3,16,16"),
    (np.zeros((4, 1, 8, 8), np.float32), None, "holds images of shape 1,8,8"),
    (np.zeros((4, 16, 16), np.float32), None, "[N,C,H,W]"),
    (np.zeros((4, 1, 16, 16), np.uint8), None, "must be a float array"),
    (np.zeros((4, 1, 16, 16), np.float32), np.zeros(3, np.int64), "one per image"),
])
def test_tensor_data_that_does_not_fit(tmp_path, capfd, images, labels, needle):
    _cnn_state(tmp_path)
    arrays = {"images": images} | ({"labels": labels} if labels is not None else {})
    np.savez(tmp_path / "x.npz", **arrays)
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), "--arch", "own_archs:SmallCNN", "--model-kwargs",
                             "in_chans=1", "--input-shape", "1,16,16", "--calib", str(tmp_path / "x.npz"),
                             "--out", str(tmp_path / "o")])
    one_line(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_pickled_npz_is_refused(tmp_path, capfd):
    marker = tmp_path / "marker"
    np.savez(tmp_path / "x.npz", images=np.array([Payload(marker)], dtype=object))
    arch = _cnn_state(tmp_path)
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), *arch, "--input-shape", "1,16,16",
                             "--calib", str(tmp_path / "x.npz")])
    one_line(code, err, "not a readable .npz")
    assert not marker.exists()


@pytest.mark.parametrize("flags,needle", [
    (["--mean", "0.1,0.2"], "--mean has 2 values"),
    (["--color", "rgb"], "--color rgb"),
    (["--mean", "a,b"], "comma-separated numbers"),
    (["--std", "0"], "positive"),
])
def test_preprocessing_that_does_not_fit(tmp_path, capfd, flags, needle):
    arch = _cnn_state(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), *arch, "--input-shape", "1,16,16",
                             "--calib", str(tmp_path / "imgs"), *flags])
    one_line(code, err, needle)


def test_corrupt_image_is_named(tmp_path, capfd):
    arch = _cnn_state(tmp_path)
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(os.urandom(300))
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "cnn.pth"), *arch, "--input-shape", "1,16,16",
                             "--calib", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")])
    one_line(code, err, "broken.jpg")
    assert not (tmp_path / "o").exists()


def test_static_batch_program_is_one_line(tmp_path, capfd):
    program = torch.export.export(SmallViT(in_chans=1).eval(), (torch.randn(1, 1, 16, 16),))
    torch.export.save(program, tmp_path / "static.pt2")
    code, err = run_in_process(capfd, ["prune", str(tmp_path / "static.pt2"), "--trust-pickle"])
    one_line(code, err, "dynamic batch")


# ---------------------------------------------------------------------------------------------------
# later stages re-open the original file: a changed file is refused


def test_changed_pickle_is_refused_by_later_stages(tmp_path, capfd):
    torch.save(SmallCNN(in_chans=1).eval(), tmp_path / "model.pt")
    code, _ = run_in_process(capfd, ["prune", str(tmp_path / "model.pt"), "--trust-pickle", "--input-shape", "1,16,16",
                           "--out", str(tmp_path / "pruned")])
    assert code == 0
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["model"]["source"]["trust_pickle"] is True
    torch.save(SmallCNN(in_chans=1, width=32).eval(), tmp_path / "model.pt")
    code, err = run_in_process(capfd, ["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "onnx")])
    one_line(code, err, "changed since it was pruned")
    (tmp_path / "model.pt").unlink()
    code, err = run_in_process(capfd, ["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "onnx")])
    one_line(code, err, "is gone")


# ---------------------------------------------------------------------------------------------------
# zoo weights: shipped in the package, refused unless they are the registry's


def test_zoo_weights_changed_or_missing(tmp_path, capfd, monkeypatch):
    from mpdeploy.models import zoo

    shipped = zoo.zoo_weights_path("digits_vit").read_bytes()
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "zoo_weights")
    (tmp_path / "zoo_weights").mkdir()
    changed = bytearray(shipped)
    changed[-1] ^= 1  # one bit of one weight
    (tmp_path / "zoo_weights" / "digits_vit.safetensors").write_bytes(bytes(changed))
    code, err = run_in_process(capfd, ["prune", "zoo:digits_vit", "--out", str(tmp_path / "o")])
    one_line(code, err, "digits_vit", "sha256", "restore it")
    assert not (tmp_path / "o").exists()
    (tmp_path / "zoo_weights" / "digits_vit.safetensors").unlink()
    code, err = run_in_process(capfd, ["prune", "zoo:digits_vit", "--out", str(tmp_path / "o")])
    one_line(code, err, "cannot read zoo model digits_vit", "reinstall mpdeploy")

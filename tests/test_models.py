import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mpdeploy.cli import main as cli_main
from mpdeploy.core.errors import MpdeployError
from mpdeploy.models.spec import ModelSpec
from mpdeploy.models.load import load_model


class PickledNet(nn.Module):  # module-level so it can be pickled whole
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _resnet18_state(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    return model, model.state_dict()


def test_timm_name_random_weights_and_input_shape():
    loaded = load_model(ModelSpec("timm:resnet18", weights="random"))
    assert loaded.input_shape == (3, 224, 224)
    assert loaded.source["kind"] == "timm" and loaded.source["weights"] == "random"


def test_unknown_timm_name():
    with pytest.raises(MpdeployError, match="unknown timm model"):
        load_model(ModelSpec("timm:resnet_does_not_exist"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_with_arch_reproduces_outputs(tmp_path, suffix):
    model, state = _resnet18_state(tmp_path)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = load_model(ModelSpec(str(path), arch="resnet18", num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.module(x), model(x))


def test_checkpoint_for_timm_name(tmp_path):
    model, state = _resnet18_state(tmp_path)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    loaded = load_model(ModelSpec("timm:resnet18", checkpoint=tmp_path / "ckpt.pth", num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.module(x), model(x))


def test_state_dict_needs_arch(tmp_path):
    _, state = _resnet18_state(tmp_path)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(MpdeployError, match="--arch"):
        load_model(ModelSpec(str(tmp_path / "w.pth")))


def test_wrong_arch_names_the_mismatch(tmp_path):
    _, state = _resnet18_state(tmp_path)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(MpdeployError, match="do not fit architecture 'resnet34'"):
        load_model(ModelSpec(str(tmp_path / "w.pth"), arch="resnet34", num_classes=10))


def test_torchscript_and_exported_program(tmp_path):
    net = PickledNet().eval()
    x = torch.randn(2, 3, 2, 2)
    torch.jit.save(torch.jit.trace(net, x), tmp_path / "net.pt")
    loaded = load_model(ModelSpec(str(tmp_path / "net.pt"), input_shape=(3, 2, 2), trust_pickle=True))
    assert torch.allclose(loaded.module(x), net(x))
    program = torch.export.export(net, (x,))
    torch.export.save(program, tmp_path / "net.pt2")
    loaded = load_model(ModelSpec(str(tmp_path / "net.pt2"), trust_pickle=True))
    assert loaded.input_shape == (3, 2, 2)  # taken from the program's example inputs
    assert torch.allclose(loaded.module(x), net(x))


def test_full_pickle_needs_trust(tmp_path):
    net = PickledNet().eval()
    torch.save(net, tmp_path / "full.pt")
    with pytest.raises(MpdeployError, match="--trust-pickle"):
        load_model(ModelSpec(str(tmp_path / "full.pt"), input_shape=(3, 2, 2)))
    loaded = load_model(ModelSpec(str(tmp_path / "full.pt"), input_shape=(3, 2, 2), trust_pickle=True))
    x = torch.randn(1, 3, 2, 2)
    assert torch.equal(loaded.module(x), net(x))


def test_truncated_and_corrupt_files(tmp_path):
    _, state = _resnet18_state(tmp_path)
    torch.save(state, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.pth").write_bytes(b"not a model at all" * 10)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("cut.pth", "junk.pth", "empty.pth"):
        with pytest.raises(MpdeployError):
            load_model(ModelSpec(str(tmp_path / name), arch="resnet18", num_classes=10))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MpdeployError, match="safetensors"):
        load_model(ModelSpec(str(tmp_path / "bad.safetensors"), arch="resnet18"))


def _cli(capsys, args):
    code = cli_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["prune", "missing.pt"], "not found"),
        (["prune", "timm:not_a_model_xyz"], "unknown timm model"),
        (["prune", "timm:resnet18", "--pattern", "4:2"], "invalid N:M pattern"),
        (["prune", "timm:resnet18", "--pattern", "a:b"], "cannot parse"),
        (["prune", "timm:resnet18", "--saliency", "wanda"], "calibration data"),
        (["prune", "timm:resnet18", "--input-shape", "3,224"], "three positive integers"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, err = _cli(capsys, args)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err
    assert "Traceback" not in "\n".join(err)


def test_cli_pickle_refused_and_truncated(capsys, tmp_path):
    torch.save(PickledNet(), tmp_path / "full.pt")
    code, err = _cli(capsys, ["prune", str(tmp_path / "full.pt"), "--input-shape", "3,2,2", "--out", str(tmp_path / "o")])
    assert code == 2 and "--trust-pickle" in err[-1] and not (tmp_path / "o").exists()


def test_model_kwargs_are_literals():
    from mpdeploy.commands.arguments import parse_model_kwargs

    got = parse_model_kwargs("in_chans=1, img_size=(32,32),global_pool=avg,drop_rate=0.1,dynamic=True,norm=None,ks=[3,5]")
    assert got == (("in_chans", 1), ("img_size", (32, 32)), ("global_pool", "avg"), ("drop_rate", 0.1),
                   ("dynamic", True), ("norm", None), ("ks", (3, 5)))
    assert parse_model_kwargs("") == ()
    for bad in ("in_chans", "=1", "x=open('f')", "1x=2", "a=(1,"):
        with pytest.raises(MpdeployError, match="--model-kwargs"):
            parse_model_kwargs(bad)


def test_timm_model_kwargs_recorded_and_rebuilt():
    from mpdeploy.commands.arguments import parse_model_kwargs
    from mpdeploy.models.load import recreate_architecture

    kwargs = parse_model_kwargs("in_chans=1,img_size=16,patch_size=4,embed_dim=32,depth=1,num_heads=2,num_classes=10")
    loaded = load_model(ModelSpec("timm:vit_tiny_patch16_224", weights="random", model_kwargs=kwargs))
    assert loaded.input_shape == (1, 16, 16)
    rebuilt = recreate_architecture(loaded.source)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in loaded.module.state_dict().items()}


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_analyze_sees_the_layers_of_programs(tmp_path, capsys, fmt):
    import json

    from own_archs import SmallCNN

    net = SmallCNN(in_chans=1).eval()
    if fmt == "pt2":
        program = torch.export.export(net, (torch.randn(2, 1, 16, 16),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, tmp_path / "net.pt2")
        args = [str(tmp_path / "net.pt2")]
    else:
        torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
        args = [str(tmp_path / "net.pt"), "--input-shape", "1,16,16"]
    code = cli_main(["-q", "analyze", *args, "--trust-pickle", "--no-plots", "--out", str(tmp_path / "an")])
    assert code == 0, capsys.readouterr().err
    layers = json.loads((tmp_path / "an" / "spectra.json").read_text())["layers"]
    assert [layer["name"] for layer in layers] == ["stem", "conv", "expand", "fc"]
    # The lifted program computes what the original module computes.
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.models.load import load_model

    loaded = load_model(ModelSpec(args[0], input_shape=(1, 16, 16), trust_pickle=True))
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded.module(x), net(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the zoo: the same shipped model on every machine


@pytest.mark.parametrize("name", ["digits_vit", "digits_cnn"])
def test_zoo_weights_are_the_registry_model(name):
    """The shipped file's sha256 is the registry's, and the model it holds scores the recorded test top-1
    exactly (benchmarks/train_zoo.py prints both; its smallest top-1/top-2 logit gap on the test split is
    0.005 for digits_cnn and 0.038 for digits_vit, far above any thread-count rounding)."""
    import hashlib

    from mpdeploy.models import zoo

    entry = zoo.zoo_entry(name)
    assert hashlib.sha256(zoo.zoo_weights_path(name).read_bytes()).hexdigest() == entry.sha256
    loaded = zoo.load_zoo_model(name)
    assert loaded.source == {"kind": "zoo", "name": name, "sha256": entry.sha256}
    assert zoo.digits_top1(loaded.module, loaded.input_shape) == entry.test_top1


def test_zoo_weights_ship_as_package_data():
    """A wheel carries the weights: pyproject's package data names the folder the registry reads."""
    import tomllib
    from pathlib import Path

    from mpdeploy.models import zoo

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["mpdeploy"]
    assert "models/zoo_weights/*.safetensors" in globs  # relative to the mpdeploy package
    assert zoo.WEIGHTS_DIR == Path(zoo.__file__).resolve().parent / "zoo_weights"
    assert zoo.WEIGHTS_DIR == Path(zoo.__file__).resolve().parents[1] / "models" / "zoo_weights"
    assert sorted(p.name for p in zoo.WEIGHTS_DIR.glob("*.safetensors")) == [f"{n}.safetensors"
                                                                             for n in zoo.list_zoo_models()]


def test_zoo_file_that_is_not_the_registrys_is_refused(tmp_path, monkeypatch):
    from mpdeploy.models import zoo

    data = bytearray(zoo.zoo_weights_path("digits_vit").read_bytes())
    data[-1] ^= 1
    (tmp_path / "digits_vit.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(MpdeployError, match=r"digits_vit's weights .* have sha256 [0-9a-f]{16}\.\.\., not the "
                                            r"registry's 274c1e4f70477949\.\.\."):
        zoo.load_zoo_model("digits_vit")


# ---------------------------------------------------------------------------------------------------
# a model trained at another size than its timm config says, with tensors of that size


def _npz(tmp_path, shape) -> str:
    import numpy as np

    path = tmp_path / "calib.npz"
    np.savez(path, images=np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32),
             labels=np.arange(8) % 10)
    return str(path)


def test_tensor_data_size_is_taken_when_the_model_runs_it(tmp_path, caplog):
    """A 1-channel CNN trained at 32x32 (its timm config still says 224) with an .npz of 32x32 images: the
    model runs 32x32 in the one-image check, so that is its input shape (logged), and data_config says so."""
    import logging

    spec = ModelSpec("timm:resnet18", weights="random", num_classes=10, model_kwargs=(("in_chans", 1),),
                     data_sources=(_npz(tmp_path, (1, 32, 32)),))
    with caplog.at_level(logging.INFO, logger="mpdeploy"):
        loaded = load_model(spec)
    assert loaded.input_shape == (1, 32, 32)
    assert tuple(loaded.data_config["input_size"]) == (1, 32, 32)
    assert any("input shape 1,32,32 taken from" in r.getMessage() and "says 1,224,224" in r.getMessage()
               for r in caplog.records)
    # an explicit --input-shape wins, and then the data must match it
    with pytest.raises(MpdeployError, match=r"holds images of shape 1,32,32 but the model takes 1,64,64 .*"
                                            r"pass --input-shape 1,32,32"):
        load_model(ModelSpec("timm:resnet18", weights="random", num_classes=10, model_kwargs=(("in_chans", 1),),
                             input_shape=(1, 64, 64), data_sources=spec.data_sources))


def test_tensor_data_the_model_cannot_run_names_the_flag(tmp_path):
    """A ViT built for 16x16 cannot run 32x32 tensors: one line offering --input-shape with the data's size."""
    kwargs = (("img_size", 16), ("patch_size", 4), ("in_chans", 1), ("embed_dim", 32), ("depth", 1),
              ("num_heads", 2))
    spec = ModelSpec("timm:vit_tiny_patch16_224", weights="random", num_classes=10, model_kwargs=kwargs,
                     data_sources=(_npz(tmp_path, (1, 32, 32)),))
    with pytest.raises(MpdeployError, match=r"shape 1,32,32 but the model takes 1,16,16 \(C,H,W\); if the model "
                                            r"was trained at 1,32,32, pass --input-shape 1,32,32") as exc:
        load_model(spec)
    assert "\n" not in str(exc.value)

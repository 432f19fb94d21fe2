"""A user's own model (not in timm), saved in every format, with their own data, through `mpdeploy build`
and `mpdeploy ship`.

Each case: save a small CNN (BatchNorm, residual add) or ViT-like model (LayerNorm, attention, MLP)
as a full pickle, state dict / safetensors (+ `--arch own_archs:Class --model-kwargs`), TorchScript
or torch.export `.pt2`; build `--sparse --backend ort` with calibration data as an ImageFolder (custom
mean/std, grayscale) or an `.npz` of tensors; then check the audited ORT engine against the pruned
PyTorch model that `load_pruned` rebuilds from the artifact (which re-opens the original file for the
pickle / TorchScript / .pt2 formats), and ship the audited engine into a Triton repository. One full
build per format family runs by default; the rest of the sweep is marked slow.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from own_archs import SmallCNN, SmallViT
from PIL import Image
from safetensors.torch import save_file

from mpdeploy.cli import main as cli_main
from mpdeploy.sparsity.patterns import NM, is_nm_compliant
from mpdeploy.sparsity.pruned import load_pruned
from mpdeploy.core.trust import granted

SIZE = 16
ARCHS = {"cnn": SmallCNN, "vit": SmallViT}


def _save(model, fmt: str, folder, channels: int) -> tuple[str, list[str]]:
    """Save `model` in format `fmt`; return (file, the flags a user passes for it)."""
    example = torch.randn(2, channels, SIZE, SIZE)
    shape = ["--input-shape", f"{channels},{SIZE},{SIZE}"]
    arch = ["--arch", f"own_archs:{type(model).__name__}", "--model-kwargs", f"in_chans={channels},num_classes=10"]
    if fmt == "pickle":
        torch.save(model, folder / "model.pt")
        return str(folder / "model.pt"), ["--trust-pickle", *shape]
    if fmt == "state_dict":
        torch.save(model.state_dict(), folder / "model.pth")
        return str(folder / "model.pth"), [*arch, *shape]
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        return str(folder / "model.safetensors"), [*arch, *shape]
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), folder / "model.ts.pt")
        return str(folder / "model.ts.pt"), ["--trust-pickle", *shape]
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "model.pt2")
    return str(folder / "model.pt2"), ["--trust-pickle"]  # the program knows its input shape


def _image_folder(root, channels: int, n: int = 24) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(cls / f"{i}.png")
    mean = "0.3" if channels == 1 else "0.4,0.5,0.6"
    return ["--calib", str(root), "--mean", mean, "--std", "0.2", "--color", "grayscale" if channels == 1 else "rgb"]


def _npz(path, channels: int, n: int = 24) -> list[str]:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.standard_normal((n, channels, SIZE, SIZE)).astype(np.float32),
             labels=np.arange(n) % 10)
    return ["--calib", str(path)]


def _build(tmp_path, arch: str, channels: int, fmt: str, data: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch](in_chans=channels).eval()
    src = tmp_path / "src"
    src.mkdir()
    path, flags = _save(model, fmt, src, channels)
    data_flags = _image_folder(tmp_path / "images", channels) if data == "folder" else _npz(tmp_path / "x.npz", channels)
    out = tmp_path / "engine"
    # A random-init model's top-1 means nothing, so its accuracy gate is opened (--max-top1-drop 1.0);
    # every other gate holds: N:M weights in the engine, outputs of the right shape, no NaN.
    code = cli_main(["build", path, "--sparse", "--backend", "ort", "--calib-batches", "2", "--calib-batch-size", "8",
                     "--batch-sizes", "1,4", "--max-top1-drop", "1.0", "--out", str(out), *flags, *data_flags])
    assert code == 0
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["passed"] is True and audit["summary"]["weights_nm_compliant"] is True

    # Rebuilds the architecture from the recorded source: re-opening the file / importing the class
    # needs the trust this test grants (a manifest grants none).
    with granted(pickle=fmt in ("pickle", "torchscript", "pt2"), imports=[f"own_archs:{ARCHS[arch].__name__}"]):
        pruned = load_pruned(out / "pruned")
    source = pruned.manifest["model"]["source"]
    expected_kind = {"state_dict": "python", "safetensors": "python", "torchscript": "torchscript",
                     "pickle": "pickle", "pt2": "exported_program"}[fmt]
    assert source["kind"] == expected_kind
    if data == "folder":
        assert pruned.manifest["model"]["data_config"]["data_spec"]["std"] == [0.2]
    params = dict(pruned.model.named_parameters())
    patterns = pruned.patterns()
    assert patterns, "nothing was pruned"
    for name, pattern in patterns.items():
        assert is_nm_compliant(params[name].detach(), pattern), name
    x = torch.randn(4, channels, SIZE, SIZE)
    with torch.no_grad():
        want = pruned.model(x).numpy()
    session = ort.InferenceSession(str(out / "engine-ort" / "sparse.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # ... and on into a Triton repository: the audited sparse engine, byte for byte.
    repo = tmp_path / "repo"
    assert cli_main(["ship", str(out), "--repo", str(repo), "--name", "own"]) == 0
    shipped = sorted((repo / "own" / "1").rglob("*.onnx"))
    assert (repo / "own" / "config.pbtxt").is_file() and len(shipped) == 1
    assert shipped[0].read_bytes() == (out / "engine-ort" / "sparse.onnx").read_bytes()


# One full build per format family in the default suite, covering both archs, 1 and 3 channels and
# both data forms; every other combination is in the slow sweep.
# (TorchScript runs on the CNN here: converting the ViT costs about 1 CPU second per load, and a build
# loads the model about 8 times.)
DEFAULT = [
    ("cnn", 1, "pickle", "folder"),
    ("vit", 3, "state_dict", "npz"),
    ("cnn", 3, "safetensors", "folder"),
    ("cnn", 1, "torchscript", "npz"),
    ("vit", 1, "pt2", "folder"),
]
FORMATS = ("pickle", "state_dict", "safetensors", "torchscript", "pt2")
SWEEP = [(a, c, f, d) for a in ARCHS for c in (1, 3) for f in FORMATS for d in ("folder", "npz")
         if (a, c, f, d) not in DEFAULT]


@pytest.mark.parametrize("arch,channels,fmt,data", DEFAULT)
def test_own_model_builds_to_audited_engine(tmp_path, arch, channels, fmt, data):
    _build(tmp_path, arch, channels, fmt, data)


@pytest.mark.slow
@pytest.mark.parametrize("arch,channels,fmt,data", SWEEP)
def test_own_model_sweep(tmp_path, arch, channels, fmt, data):
    _build(tmp_path, arch, channels, fmt, data)


def test_is_nm_compliant_sanity():
    # The compliance check above must be able to fail: a dense weight is not 2:4.
    assert not is_nm_compliant(torch.ones(4, 8), NM(2, 4))


def _users_digits(folder) -> tuple[str, str, str]:
    """A user's own preprocessing of their data: digits upsampled to 16x16, scaled (x/16 - 0.5) / 0.25,
    saved as .npz tensors with labels (train / calibration / held-out evaluation)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = np.kron(x.reshape(-1, 1, 8, 8) / 16.0, np.ones((1, 1, 2, 2)))
    images = ((images - 0.5) / 0.25).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    train, held = order[:1400], order[1400:]
    paths = (str(folder / "train.npz"), str(folder / "calib.npz"), str(folder / "eval.npz"))
    np.savez(paths[0], images=images[train], labels=y[train])
    np.savez(paths[1], images=images[train[:256]], labels=y[train[:256]])
    np.savez(paths[2], images=images[held], labels=y[held])
    return paths


@pytest.mark.slow  # the default suite keeps under 10 minutes on 2 cores
def test_trained_own_model_passes_every_default_gate(tmp_path):
    """A model trained elsewhere (here: SmallViT, 25 epochs on the user's own tensors, ~96% held-out
    top-1), saved as a full pickle, goes through build --sparse with a distillation epoch on the user's
    data and an audit on their held-out images, with the default gates (top-1 drop <= 2 points): exit 0,
    and shipped."""
    train, calib, held = _users_digits(tmp_path)
    torch.manual_seed(0)
    model = SmallViT(in_chans=1, dim=64)
    with np.load(train) as f:
        x, y = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long()
    epochs, batches = 25, (len(y) + 63) // 64
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * batches)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "engine"
    code = cli_main(["build", str(tmp_path / "model.pt"), "--trust-pickle", "--input-shape", "1,16,16", "--sparse",
                     "--backend", "ort", "--calib", calib, "--distill-epochs", "1", "--distill-data", train,
                     "--eval-data", held, "--batch-sizes", "1,8", "--out", str(out)])
    assert code == 0
    audit = json.loads((out / "audit" / "audit.json").read_text())
    accuracy = audit["accuracy"]
    assert audit["passed"] is True and accuracy["top1_dense"] > 0.9, accuracy
    assert accuracy["top1_sparse"] >= accuracy["top1_dense"] - 0.02
    assert (out / "distilled" / "manifest.json").is_file()
    assert "eval.npz" in json.loads((out / "distilled" / "manifest.json").read_text())["distill"]["top1_split"]
    assert cli_main(["ship", str(out), "--repo", str(tmp_path / "repo"), "--name", "own"]) == 0

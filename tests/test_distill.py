"""mpdeploy distill: KD loss, frozen masks, checkpoint/resume, a real 2-process torchrun (gloo), CLI errors.

The models are tiny timm ViTs (8x8 digits, 2 blocks, width 32) at random init: these tests check the
mechanics, not the recovered accuracy (benchmarks/distill_digits.py measures that on the zoo models).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import mpdeploy.distill.checkpoint as distill_checkpoint
import mpdeploy.distill.config as distill_config
import mpdeploy.distill.train as distill_train
from mpdeploy.core import artifacts
from mpdeploy.distill.artifact import DUMP_ENV, state_hash
from mpdeploy.distill.config import DistillConfig
from mpdeploy.distill.stage import distill
from mpdeploy.distill.train import kd_loss
from mpdeploy.core.errors import MpdeployError
from mpdeploy.models.spec import LoadedModel
from mpdeploy.sparsity.patterns import NM, is_nm_compliant
from mpdeploy.prune.stage import PruneConfig, prune
from mpdeploy.sparsity.pruned import load_pruned

ROOT = Path(__file__).resolve().parents[1]
KWARGS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A 2:4 (uniform magnitude) pruned artifact of a tiny random-init ViT."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    loaded = LoadedModel(model, (1, 8, 8), "tiny_vit",
                         {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": dict(KWARGS)})
    return prune(loaded, PruneConfig(budget="uniform"), tmp_path_factory.mktemp("art") / "pruned")


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory) -> Path:
    """A 2:4 pruned artifact of timm's tiny test ResNet (BatchNorm: its statistics must agree across ranks)."""
    torch.manual_seed(0)
    kwargs = {"in_chans": 1, "num_classes": 10}
    model = timm.create_model("test_resnet", pretrained=False, **kwargs)
    loaded = LoadedModel(model, (1, 8, 8), "tiny_cnn", {"kind": "timm", "name": "test_resnet", "kwargs": kwargs})
    return prune(loaded, PruneConfig(budget="uniform"), tmp_path_factory.mktemp("cnn") / "pruned")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _quiet(*args, **kwargs) -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    a, temp, eps = 0.3, 2.0, 0.1

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for srow, trow, label in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax([v / temp for v in srow]), softmax([v / temp for v in trow])
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
        p = softmax(srow)
        target = [eps / 3 + (1 - eps) * (k == label) for k in range(3)]
        ce += -sum(q * math.log(pk) for q, pk in zip(target, p))
    expected = a * temp**2 * kl / 2 + (1 - a) * ce / 2
    got = kd_loss(s, t, y, alpha=a, temperature=temp, label_smoothing=eps)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Student equal to teacher, alpha = 1: no KD loss at all.
    assert float(kd_loss(t, t, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-7)


def test_config_rejects_bad_values():
    from mpdeploy.core.errors import MpdeployError

    for bad in (dict(epochs=0), dict(alpha=1.5), dict(temperature=0), dict(optimizer="lion"), dict(lr=-1.0),
                dict(label_smoothing=1.0), dict(batch_size=0)):
        with pytest.raises(MpdeployError):
            DistillConfig(**bad)


def test_default_lr_and_optimizer():
    lr, _ = distill_config.default_lr("adamw", distill_config.PAPER_STEPS)
    assert lr == pytest.approx(1e-5)  # a paper-length run gets the paper's lr
    assert distill_config.default_lr("sgd", 10)[0] == pytest.approx(1e-3 * distill_config.MAX_LR_SCALE)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    resnet = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=10)
    own_vit = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 4, stride=4), torch.nn.Flatten(2), torch.nn.LayerNorm(4))
    assert distill_config.default_optimizer(vit)[0] == "adamw" and distill_config.default_optimizer(own_vit)[0] == "adamw"
    assert distill_config.default_optimizer(resnet)[0] == "sgd"


# ---------------------------------------------------------------------------------------------------
# masks


def test_masks_unchanged_exactly(pruned, tmp_path):
    out = distill(pruned, DistillConfig(epochs=1, lr=1e-3), tmp_path / "distilled", progress=_quiet)
    before, after = load_pruned(pruned), load_pruned(out)  # verifies the new manifest's hashes
    patterns = after.patterns()
    assert set(after.masks) == set(before.masks) and after.masks
    params_before = dict(before.model.named_parameters())
    moved = 0
    for name, mask in after.masks.items():
        assert torch.equal(mask, before.masks[name])
        w = dict(after.model.named_parameters())[name].detach()
        assert is_nm_compliant(w, patterns[name]) and patterns[name] == NM(2, 4)
        assert torch.equal(w == 0, ~mask)  # zero set == complement of the mask, exactly
        moved += int(not torch.equal(w, params_before[name].detach()))
    assert moved == len(after.masks)  # training really changed the kept weights
    # The teacher and the masks are carried over byte for byte.
    for rel in ("dense.safetensors", "masks.safetensors"):
        assert (out / rel).read_bytes() == (pruned / rel).read_bytes()
    record = after.manifest["distill"]
    assert [e["epoch"] for e in record["epochs"]] == [1]
    assert record["teacher"]["kind"] == "artifact" and record["top1_after"] is not None
    assert record["config"]["resolved"]["optimizer"] == "adamw"
    # Its own artifact kind, made from exactly this prune output (the input's config stays in the input).
    assert after.manifest["kind"] == "distilled" and before.manifest["kind"] == "pruned"
    assert after.manifest["sources"]["pruned"]["manifest_sha256"] == artifacts.manifest_hash(pruned)
    assert after.manifest["layers"] == before.manifest["layers"]
    assert not (tmp_path / ".distill-ckpt-distilled").exists()  # checkpoint removed after success


def test_mask_drift_fails_and_writes_nothing(pruned, tmp_path, monkeypatch):
    # Without the gradient zeroing and the re-masking, AdamW moves pruned weights: must be caught.
    monkeypatch.setattr(distill_train, "apply_masks", lambda model, masks: None)  # where the loop looks them up
    monkeypatch.setattr(distill_train, "zero_masked_grads", lambda masked: None)
    with pytest.raises(RuntimeError, match="masks changed"):
        distill(pruned, DistillConfig(epochs=1, lr=1e-3), tmp_path / "out", progress=_quiet)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# checkpoint / resume


class _Interrupt(Exception):
    pass


def test_resume_continues_and_matches_uninterrupted(pruned, tmp_path):
    config = DistillConfig(epochs=2, lr=1e-3)
    full = distill(pruned, config, tmp_path / "full", progress=_quiet)

    def stop_at_epoch_2(step, done, total, epoch, **metrics):
        if epoch == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(pruned, config, tmp_path / "resumed", progress=stop_at_epoch_2)
    assert not (tmp_path / "resumed").exists()
    assert json.loads((tmp_path / ".distill-ckpt-resumed" / "meta.json").read_text())["epochs_done"] == 1

    seen = []
    out = distill(pruned, config, tmp_path / "resumed", progress=lambda s, d, t, epoch, **m: seen.append(epoch))
    assert seen and set(seen) == {2}  # epoch 1 was not run again
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    record = json.loads((out / "manifest.json").read_text())["distill"]
    assert record["resumed_from_epoch"] == 1 and [e["epoch"] for e in record["epochs"]] == [1, 2]


def test_checkpoint_of_other_config_is_ignored(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    distill_checkpoint.save_checkpoint(tmp_path / "ckpt", "key-a", model, opt, sched, scaler, 1, [{"epoch": 1}])
    state, records = distill_checkpoint.load_checkpoint(tmp_path / "ckpt", "key-a")
    assert state["epochs_done"] == 1 and records == [{"epoch": 1}]
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert distill_checkpoint.load_checkpoint(tmp_path / "ckpt", "key-b") is None  # other config / input
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"garbage")
    assert distill_checkpoint.load_checkpoint(tmp_path / "ckpt", "key-a") is None  # damaged: start over


# ---------------------------------------------------------------------------------------------------
# torchrun, 2 processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_commands_present() -> bool:
    from mpdeploy.cli import COMMANDS

    return all(importlib.util.find_spec(f"mpdeploy.commands.{name}") for name in COMMANDS)


_LAUNCHER = """
import importlib.util, sys
from mpdeploy import cli
# Other stages' command modules may not exist in this checkout yet: keep the ones that do.
cli.COMMANDS = {n: h for n, h in cli.COMMANDS.items() if importlib.util.find_spec(f"mpdeploy.commands.{n}")}
sys.exit(cli.main())
"""


def test_torchrun_two_processes_identical_weights(pruned_cnn, tmp_path):
    art = _copy(pruned_cnn, tmp_path / "pruned")
    dump = tmp_path / "dump"
    if _all_commands_present():
        target = ["-m", "mpdeploy"]
    else:
        (tmp_path / "launch.py").write_text(_LAUNCHER)
        target = [str(tmp_path / "launch.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", *target, "distill", str(art), "--epochs", "1",
           "--batch-size", "64", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           DUMP_ENV: str(dump), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    distilled = tmp_path / "distilled"  # no --out: distilled/ beside the input, never the input itself
    out = load_pruned(distilled)  # hashes and the chain back to the input verified
    assert state_hash(out.model.state_dict()) == ranks[1]["state_sha256"]  # BatchNorm buffers included
    record = out.manifest["distill"]
    resolved = record["config"]["resolved"]
    assert resolved["world_size"] == 2 and resolved["batch_per_process"] == 32 and resolved["optimizer"] == "sgd"
    # both shards counted: 1,257 digits train images less 126 held out for validation, padded to two equal shards
    assert record["epochs"][0]["images"] == 1132
    for name, mask in out.masks.items():
        w = dict(out.model.named_parameters())[name].detach()
        assert torch.equal(w == 0, ~mask) and is_nm_compliant(w, NM(2, 4))
    assert out.masks and (distilled / "masks.safetensors").read_bytes() == (pruned_cnn / "masks.safetensors").read_bytes()
    assert (art / "model.safetensors").read_bytes() == (pruned_cnn / "model.safetensors").read_bytes()
    assert not any(p.name.startswith(".distill-ckpt") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# CLI


def _cli(argv: list[str], monkeypatch) -> int:
    from mpdeploy import cli

    present = {n: h for n, h in cli.COMMANDS.items() if importlib.util.find_spec(f"mpdeploy.commands.{n}")}
    monkeypatch.setattr(cli, "COMMANDS", present)
    return cli.main(argv)


def test_cli_bad_input_exits_2(pruned, tmp_path, monkeypatch, capsys):
    assert _cli(["distill", str(tmp_path / "nope")], monkeypatch) == 2
    assert "not found" in capsys.readouterr().err
    assert _cli(["distill", str(pruned), "--teacher", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
                monkeypatch) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert _cli(["distill", str(pruned), "--teacher", "timm:no_such_model_xyz", "--out", str(tmp_path / "o")],
                monkeypatch) == 2
    assert "unknown timm model" in capsys.readouterr().err
    assert _cli(["distill", str(pruned), "--epochs", "0"], monkeypatch) == 2
    assert _cli(["distill", str(pruned), "--data", str(tmp_path / "no_dir"), "--out", str(tmp_path / "o")],
                monkeypatch) == 2
    assert not (tmp_path / "o").exists()


def test_cli_writes_distilled_beside_the_input(pruned, tmp_path, monkeypatch, capsys):
    art = _copy(pruned, tmp_path / "pruned")
    input_manifest = (art / "manifest.json").read_bytes()
    assert _cli(["distill", str(art), "--epochs", "1", "--lr", "1e-3"], monkeypatch) == 0
    assert "top-1" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "distilled" / "manifest.json").read_text())
    assert manifest["distill"]["epochs"][0]["epoch"] == 1
    assert (tmp_path / "distilled" / "model.safetensors").read_bytes() != (pruned / "model.safetensors").read_bytes()
    assert (art / "manifest.json").read_bytes() == input_manifest  # the input is never rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled", "pruned"]  # no temp or checkpoint left


def _npz(path: Path, split: str, labels: bool = True) -> Path:
    """The user's own pre-processed tensors (digits at 1x8x8 here) in an .npz."""
    import numpy as np

    from mpdeploy.models.data import digits_tensors

    x, y = digits_tensors((1, 8, 8), split)
    arrays = {"images": x.numpy()[:200]}
    if labels:
        arrays["labels"] = y.numpy()[:200]
    np.savez(path, **arrays)
    return path


def test_top1_before_and_after_on_the_users_labelled_data(pruned, tmp_path):
    """Known answer: the recorded top-1 after distillation equals the saved model's top-1 on --eval-data,
    recomputed here by hand; without --eval-data the record says the images are a training sample."""
    import numpy as np

    train, held = _npz(tmp_path / "train.npz", "train"), _npz(tmp_path / "held.npz", "test")
    out = distill(pruned, DistillConfig(data=str(train), eval_data=str(held), epochs=1, lr=1e-3),
                  tmp_path / "distilled", progress=_quiet)
    record = load_pruned(out).manifest["distill"]
    with np.load(held) as f:
        x, y = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
    with torch.no_grad():
        by_hand = 100.0 * float((load_pruned(out).model.eval()(x).argmax(-1) == y).float().mean())
    assert record["top1_after"] == pytest.approx(by_hand, abs=1e-6)
    assert record["top1_before"] is not None and "held.npz" in record["top1_split"]

    out2 = distill(pruned, DistillConfig(data=str(train), epochs=1, lr=1e-3), tmp_path / "d2", progress=_quiet)
    split = load_pruned(out2).manifest["distill"]["top1_split"]
    assert "sample of the training data" in split and "not held out" in split

    with pytest.raises(MpdeployError, match="has no labels"):
        distill(pruned, DistillConfig(data=str(train), eval_data=str(_npz(tmp_path / "nolab.npz", "test", False)),
                                      epochs=1), tmp_path / "d3", progress=_quiet)
    assert not (tmp_path / "d3").exists()


# ---------------------------------------------------------------------------------------------------
# the better of before / after, chosen on images held out of the distillation data


def test_validation_is_carved_from_the_distillation_data_only():
    from mpdeploy.models.data import load_images
    from mpdeploy.distill.datasets import carve_validation

    data = load_images("digits", (1, 8, 8), split="train")
    train, validation = carve_validation(data, 0.1, seed=0)
    t, v = train.dataset.indices, validation.dataset.indices
    assert len(v) == round(0.1 * len(data)) and len(t) + len(v) == len(data) and not set(t) & set(v)
    assert carve_validation(data, 0.1, seed=0)[1].dataset.indices == v  # seeded: every rank, every run
    assert "held out of the distillation data" in validation.description
    # digits' test split (the evaluation data) is another split: the validation images are train images
    from mpdeploy.models.data import digits_split

    train_ids = digits_split(1797, "train").tolist()
    test_ids = set(digits_split(1797, "test").tolist())
    assert not {train_ids[i] for i in v} & test_ids
    assert carve_validation(data, 0.0, seed=0) == (data, None)
    assert carve_validation(load_images("synthetic", (1, 8, 8), limit=300), 0.1, seed=0)[1] is None


@pytest.fixture(scope="module")
def pruned_zoo(tmp_path_factory) -> Path:
    """The shipped digits_vit pruned 2:4 (uniform magnitude): an accurate student that a bad run can only hurt."""
    from mpdeploy.models.zoo import load_zoo_model

    return prune(load_zoo_model("digits_vit"), PruneConfig(budget="uniform"),
                 tmp_path_factory.mktemp("zoo") / "pruned")


def test_a_run_that_hurts_keeps_the_pruned_weights(pruned_zoo, tmp_path):
    """Planted fault: one epoch at lr 1.0 wrecks the ViT. The validation split sees it, the artifact keeps
    the pruned weights bit for bit, and the record says so; the test split's top-1 is only reported."""
    out = distill(pruned_zoo, DistillConfig(epochs=1, lr=1.0, optimizer="adamw", batch_size=256),
                  tmp_path / "distilled", _quiet)
    record = artifacts.read_manifest(out, "distilled")["distill"]
    choice = record["selection"]
    assert choice["kept"] == "pruned" and choice["val_top1_after"] < choice["val_top1_before"] - 20
    assert "126 images held out of the distillation data" in choice["validation"]
    assert state_hash(load_file(str(out / "model.safetensors"))) == state_hash(
        load_file(str(pruned_zoo / "model.safetensors")))
    assert record["top1_after"] == record["top1_before"] and record["top1_distilled"] < record["top1_before"] - 20
    assert artifacts.read_manifest(out, "distilled")["pruned_with"]["budget"] == "uniform"


def test_a_run_that_helps_keeps_the_distilled_weights(pruned_zoo, tmp_path):
    out = distill(pruned_zoo, DistillConfig(epochs=1), tmp_path / "distilled", _quiet)
    record = artifacts.read_manifest(out, "distilled")["distill"]
    choice = record["selection"]
    assert choice["kept"] == "distilled" and choice["val_top1_after"] >= choice["val_top1_before"]
    assert record["top1_after"] == record["top1_distilled"]
    assert state_hash(load_file(str(out / "model.safetensors"))) != state_hash(
        load_file(str(pruned_zoo / "model.safetensors")))

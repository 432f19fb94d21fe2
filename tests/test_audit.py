"""The audit stage: a correct sparse engine passes, broken ones fail for the right reason; report; CLI.

The engine folders are built by hand per the build engineer's contract (pruned/ and its onnx/ export, as
mpdeploy makes them, + engine-ort/ with sparse.onnx, dense.onnx and a kind "engine" manifest recording
both as its sources: the planted faults live in the engine files) from the zoo's digits_cnn (its weights ship with
mpdeploy). Latency repetitions are tiny: speed is never asserted here.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mpdeploy.core import artifacts
from mpdeploy import cli
from mpdeploy.audit.common import SCHEMA
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.engine import check_engine_weights
from mpdeploy.audit.metrics import certified_mask, dense_margins, labels_fit, logit_distance, measure_latency
from mpdeploy.audit.stage import audit
from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.patterns import NM, nm_mask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# engine folders


def _export(model: torch.nn.Module, shape, path: Path) -> None:
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.randn(2, *shape),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )


def _write_engine(root: Path, sparse: torch.nn.Module, dense: torch.nn.Module, shape, classes: int) -> None:
    ed = root / "engine-ort"
    if ed.exists():
        shutil.rmtree(ed)
    ed.mkdir(parents=True)
    _export(sparse, shape, ed / "sparse.onnx")
    _export(dense, shape, ed / "dense.onnx")
    _write_engine_manifest(root, shape, classes, "fp32")


def _write_engine_manifest(root: Path, shape, classes: int, precision: str) -> None:
    ed = root / "engine-ort"
    (ed / "build_report.json").write_text("{}")
    artifacts.write_manifest(ed, "engine", {}, sources={"onnx": root / "onnx", "weights": root / "pruned"}, extra={
        "backend": "ort",
        "precision": precision,
        "variants": {"sparse": "sparse.onnx", "dense": "dense.onnx"},
        "io": {"inputs": [{"name": "input", "dtype": "float32", "shape": [-1, *shape]}],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, classes]}]},
        "device": {"name": "cpu", "gpu": None, "tensorrt_version": None},
        "file_sha256": {f: artifacts.sha256_file(ed / f) for f in ("sparse.onnx", "dense.onnx")},
    })


@pytest.fixture(scope="module")
def base_root(tmp_path_factory) -> Path:
    """engines/digits_cnn: 2:4 on the zoo CNN's cheapest 20% of MACs (mp budget) + its ORT engine pair."""
    from mpdeploy.export.stage import ExportConfig, export
    from mpdeploy.prune.stage import PruneConfig, prune
    from mpdeploy.sparsity.pruned import load_pruned
    from mpdeploy.models.zoo import load_zoo_model

    loaded = load_zoo_model("digits_cnn")
    root = tmp_path_factory.mktemp("engines") / "digits_cnn"
    prune(loaded, PruneConfig(budget="mp", target_mac_reduction=0.2), root / "pruned")
    export(root / "pruned", ExportConfig(allow_ineligible=True), root / "onnx")
    sparse = load_pruned(root / "pruned", "sparse")
    dense = load_pruned(root / "pruned", "dense")
    _write_engine(root, sparse.model, dense.model, sparse.input_shape, 10)
    return root


@pytest.fixture(scope="module")
def fast(base_root) -> dict:
    """Tiny timing settings, and an accuracy gate 3 points above what the pruning itself costs in PyTorch.

    The small CNN is fragile (uniform 2:4 without recovery costs it ~60 points, 20% of its MACs 5-10,
    varying with the training run), so the gate follows the pruned model's own measured cost: a correct
    engine reproduces it, a broken one does not.
    """
    from mpdeploy.sparsity.pruned import load_pruned
    from mpdeploy.models.zoo import digits_top1

    dense = load_pruned(base_root / "pruned", "dense")
    sparse = load_pruned(base_root / "pruned", "sparse")
    drop = digits_top1(dense.model, dense.input_shape) - digits_top1(sparse.model, sparse.input_shape)
    return dict(batch_sizes=(1, 4), warmup=1, repeats=2, calls_per_round=1, sensitivity_batch=16,
                max_top1_drop=round(max(drop, 0.0) + 0.03, 4))


def _variant(base: Path, tmp_path_factory, name: str, breaker) -> Path:
    """A copy of the base engine root whose sparse engine is rebuilt from `breaker(dense, sparse, masks)`."""
    from mpdeploy.sparsity.pruned import load_pruned

    root = tmp_path_factory.mktemp(name) / name
    shutil.copytree(base / "pruned", root / "pruned")
    shutil.copytree(base / "onnx", root / "onnx")
    sparse = load_pruned(root / "pruned", "sparse")
    dense = load_pruned(root / "pruned", "dense")
    broken = breaker(dense.model, sparse.model, sparse.masks)
    _write_engine(root, broken, dense.model, sparse.input_shape, 10)
    return root


def _wrong_axis(dense, sparse, masks):
    """2:4 along the OUTPUT channels: as sparse as intended, but not what TensorRT accelerates."""
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name in masks:
            w = params[name]
            swapped = w.transpose(0, 1)
            w.mul_(nm_mask(swapped.abs(), NM(2, 4)).transpose(0, 1).to(w.dtype))
    return dense


def _scrambled(dense, sparse, masks):
    """Kept weights shuffled among the kept positions: still exactly 2:4, but a different function."""
    params = dict(sparse.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mask in masks.items():
            w = params[name]
            kept = w[mask]
            w[mask] = kept[torch.randperm(kept.numel(), generator=gen)]
    return sparse


@pytest.fixture(scope="module")
def wrong_axis_root(base_root, tmp_path_factory) -> Path:
    return _variant(base_root, tmp_path_factory, "wrong_axis", _wrong_axis)


@pytest.fixture(scope="module")
def scrambled_root(base_root, tmp_path_factory) -> Path:
    return _variant(base_root, tmp_path_factory, "scrambled", _scrambled)


@pytest.fixture(scope="module")
def base_audit(base_root, fast) -> dict:
    out = audit(base_root, AuditConfig(**fast))
    return json.loads((out / "audit.json").read_text())


# ---------------------------------------------------------------------------------------------------
# pure functions


def test_certified_mask_known_margins():
    dense = np.array([
        [3.0, 1.0, 0.0],   # m = 2.0
        [1.0, 0.9, 0.0],   # m = 0.1
        [1.0, 0.9, 0.0],   # m = 0.1
        [0.5, 0.5, 0.0],   # m = 0 (tie)
        [0.0, 3.0, -1.0],  # m = 3.0
    ])
    delta = np.array([
        [0.0, 0.99, 0.0],  # d = 0.99 -> 2d = 1.98 < 2.0: certified
        [0.05, 0.0, 0.0],  # d = 0.05 -> 2d = 0.1, not > : not certified
        [0.0, -0.04, 0.0],  # d = 0.04 -> 0.08 < 0.1: certified
        [0.0, 0.0, 0.0],   # tie: never certified, even unperturbed
        [2.0, 0.0, 0.0],   # d = 2 -> 4 > 3: not certified (and the top-1 does not even change)
    ])
    np.testing.assert_allclose(dense_margins(dense), [2.0, 0.1, 0.1, 0.0, 3.0])
    np.testing.assert_allclose(logit_distance(dense, dense + delta), [0.99, 0.05, 0.04, 0.0, 2.0])
    assert certified_mask(dense, dense + delta).tolist() == [True, False, True, False, False]


def test_certified_implies_same_top1():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(2000, 10))
    sparse = dense + rng.normal(scale=0.2, size=dense.shape)
    cert = certified_mask(dense, sparse)
    assert 0.05 < cert.mean() < 0.95
    assert (dense.argmax(1)[cert] == sparse.argmax(1)[cert]).all()


def test_certified_mask_rejects_bad_shapes():
    with pytest.raises(ValueError):
        certified_mask(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(ValueError):
        certified_mask(np.zeros((3, 4)), np.zeros((3, 5)))


def test_labels_fit_rules():
    assert not labels_fit("synthetic", None, 10, None, 100)[0]
    ok, why = labels_fit("digits", 10, 1000, 0.0, 500)
    assert not ok and "1000 outputs" in why
    ok, why = labels_fit("digits", 10, 10, 0.11, 500)
    assert not ok and "chance" in why
    assert labels_fit("digits", 10, 10, 0.95, 500)[0]


def test_latency_rounds_alternate_order():
    calls: list[tuple[str, int]] = []

    class Fake:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def time(self, x, iterations):
            calls.append((self.name, iterations))
            return [self.ms] * iterations

    runners = {"dense": Fake("dense", 2.0), "sparse": Fake("sparse", 1.0)}
    out = measure_latency(runners, {4: np.zeros((4, 1))}, warmup=3, repeats=4, calls_per_round=2)
    assert calls[:2] == [("dense", 3), ("sparse", 3)]  # warm-up
    assert [c[0] for c in calls[2:]] == ["dense", "sparse", "sparse", "dense"] * 2
    assert out[4]["ratio_p50"] == pytest.approx(2.0)
    assert out[4]["dense"]["samples"] == 8
    assert out[4]["sparse"]["throughput_img_s"] == pytest.approx(4000.0)
    assert out[4]["ratio_spread"]["p10"] == pytest.approx(2.0)


def test_config_validation():
    with pytest.raises(MpdeployError, match="batch sizes"):
        AuditConfig(batch_sizes=(0,))
    with pytest.raises(MpdeployError, match="max-top1-drop"):
        AuditConfig(max_top1_drop=2.0)
    with pytest.raises(MpdeployError, match="min-speedup"):
        AuditConfig(min_speedup=0)


class _Tokens(torch.nn.Module):
    """A Linear on [batch, tokens, features]: the legacy exporter stores its weight transposed for MatMul."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x).mean(dim=1)


def test_weight_check_finds_transposed_matmul_weights(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = _Tokens().eval()
    mask = nm_mask(model.fc.weight.abs(), NM(2, 4))
    layers = [{"name": "fc", "param": "fc.weight", "pattern": "2:4"}]
    with torch.no_grad():
        model.fc.weight.mul_(mask)
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(model, (torch.randn(2, 5, 16),), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False)
    assert any(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)
    good = check_engine_weights(path, layers, {"fc.weight": mask.numpy()})
    assert good["violations"] == [] and good["tensors"][0]["axis"] == 0 and good["tensors"][0]["found_by"] == "mask"
    # the same sparsity along the output axis: no initializer carries the pruned mask, none is 2:4 along `in`
    with torch.no_grad():
        model.fc.weight.copy_(_Tokens().fc.weight)
        model.fc.weight.mul_(nm_mask(model.fc.weight.abs().t(), NM(2, 4)).t())
    torch.onnx.export(model, (torch.randn(2, 5, 16),), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False)
    bad = check_engine_weights(path, layers, {"fc.weight": mask.numpy()})
    assert len(bad["violations"]) == 1 and "is 2:4 along the input-channel axis" in bad["violations"][0]["problem"]


# ---------------------------------------------------------------------------------------------------
# whole audits


def test_correct_engine_passes(base_root, base_audit):
    a = base_audit
    assert a["passed"] is True, a["failures"]
    for key in ("schema", "backend", "device", "passed", "failures", "summary", "latency", "accuracy",
                "sensitivity", "thresholds", "data", "weights"):
        assert key in a
    assert a["schema"] == SCHEMA and a["backend"] == "ort"
    s = a["summary"]
    for key in ("top1_dense", "top1_sparse", "top1_drop", "top5_dense", "top5_sparse", "agreement",
                "certified_fraction", "max_logit_error", "mean_logit_error", "speedup_p50"):
        assert key in s
    assert s["labels_meaningful"] is True and s["accuracy_gate"] == "top1_drop"
    assert s["top1_dense"] > 0.9  # a trained model: the accuracy numbers mean something
    assert s["top1_drop"] <= a["thresholds"]["max_top1_drop"]
    assert 0 < s["certified_fraction"] <= s["agreement"] <= 1
    assert set(s["speedup_p50"]) == {"1", "4"}
    for batch in ("1", "4"):
        lat = a["latency"][batch]
        for variant in ("dense", "sparse"):
            assert {"p50", "p90", "p99", "mean", "throughput_img_s"} <= set(lat[variant])
        assert {"p10", "p90", "iqr"} <= set(lat["ratio_spread"])
    assert a["weights"]["checked"] > 0 and not a["weights"]["violations"]
    assert all(t["found_by"] == "mask" for t in a["weights"]["tensors"])
    assert a["engine_vs_pytorch"]["sparse"]["relative"] < 1e-3
    sens = a["sensitivity"]
    assert len(sens) == a["weights"]["checked"] and all(r["logit_effect"] >= 0 for r in sens)
    assert any("no 2:4 sparse kernels" in w for w in a["warnings"])
    # the report a person reads, and its plots
    md = (base_root / "audit" / "audit.md").read_text()
    assert "**PASS**" in md
    # the speed gate line says what was applied (ORT on CPU: no sparse kernels, no claim), never "none"
    assert "- speed gate: none: this backend has no sparse kernels" in md
    for png in ("latency.png", "accuracy.png", "certified.png", "sensitivity.png"):
        assert f"]({png})" in md
        assert (base_root / "audit" / png).read_bytes()[:8] == PNG_MAGIC
    artifacts.read_manifest(base_root / "audit", "audit")  # a proper artifact, hashes intact


def test_wrong_axis_engine_fails_compliance(wrong_axis_root, fast):
    config = AuditConfig(plots=False, **{**fast, "sensitivity_batch": 0})
    a = json.loads((audit(wrong_axis_root, config) / "audit.json").read_text())
    assert a["passed"] is False
    assert any("not N:M-compliant" in f for f in a["failures"]), a["failures"]
    assert a["summary"]["weights_nm_compliant"] is False
    assert "2:4 along the input-channel axis" in a["weights"]["violations"][0]["problem"]


def test_scrambled_engine_fails_accuracy(scrambled_root, fast):
    config = AuditConfig(plots=False, **{**fast, "sensitivity_batch": 0})
    a = json.loads((audit(scrambled_root, config) / "audit.json").read_text())
    assert a["passed"] is False
    assert any(f.startswith("top-1 drop") for f in a["failures"]), a["failures"]
    assert a["weights"]["violations"] == []  # still 2:4: only the accuracy gate can catch it
    assert a["summary"]["agreement"] < 0.9
    assert any("may not have been built from this pruned" in w for w in a["warnings"])


def test_labels_that_do_not_fit_gate_on_agreement_and_speed_gate(base_root, fast, tmp_path):
    root = tmp_path / "synthetic"
    shutil.copytree(base_root, root, ignore=shutil.ignore_patterns("audit"))
    config = AuditConfig(data="synthetic", max_eval_images=32, plots=False, min_speedup=1000.0,
                         **{**fast, "sensitivity_batch": 0, "max_top1_drop": 1.0})
    a = json.loads((audit(root, config) / "audit.json").read_text())
    assert a["summary"]["labels_meaningful"] is False
    assert a["summary"]["accuracy_gate"] == "top1_disagreement"
    assert a["summary"]["top1_dense"] is None and a["summary"]["agreement"] is not None
    assert any("labels not used" in w for w in a["warnings"])
    # max_top1_drop = 1.0 lets any disagreement pass; the impossible speed gate is the only failure
    assert a["passed"] is False and len(a["failures"]) == 1 and "speedup at batch 4" in a["failures"][0]
    md = (root / "audit" / "audit.md").read_text()
    assert "- speed gate: at least 1000x dense p50 / sparse p50 at the largest batch" in md
    assert a["sensitivity"] == [] and a["sensitivity_summary"] is None


def test_an_audit_records_its_host_name_and_no_placement_unless_given(base_audit):
    host = base_audit["device"]["host"]
    assert host["hostname"] == socket.gethostname() and host["placement"] is None
    assert "placement" not in base_audit["config"]


def test_a_placement_is_recorded_and_left_out_of_the_reuse_key(base_root, fast, tmp_path):
    """The caller's placement (the sweep: its Ray node) lands under device.host and in audit.md's host line; a
    re-run placed elsewhere reuses the audit, which keeps the node that made it."""
    from mpdeploy.audit.run import audit_stage
    from mpdeploy.core.kinds import AuditFolder
    from mpdeploy.core.names import engine_folder_name

    root = tmp_path / "placed"
    shutil.copytree(base_root, root, ignore=shutil.ignore_patterns("audit"))
    config = AuditConfig(plots=False, **{**fast, "sensitivity_batch": 0})
    engine_dir = root / engine_folder_name("ort")
    placed = {"node_id": "ab" * 28, "ip": "10.0.0.7"}
    first = audit_stage(engine_dir, replace(config, placement=placed), None, False, None)
    folder = AuditFolder.open(first.path)
    result = folder.result()
    assert first.status == "built" and result["device"]["host"]["placement"] == placed
    assert "placement" not in folder.config and "placement" not in result["config"]
    assert f"node_id `{placed['node_id']}`, ip `10.0.0.7`" in folder.file(AuditFolder.MARKDOWN).read_text()
    again = audit_stage(engine_dir, replace(config, placement={"node_id": "cd" * 28}), None, False, None)
    assert again.status == "reused" and AuditFolder.open(again.path).result()["device"]["host"]["placement"] == placed


def test_modified_engine_file_is_bad_input(base_root, tmp_path):
    root = tmp_path / "modified"
    shutil.copytree(base_root, root, ignore=shutil.ignore_patterns("audit"))
    with open(root / "engine-ort" / "sparse.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MpdeployError, match="does not match the (sha256|hash)"):
        audit(root, AuditConfig(plots=False))
    (root / "engine-ort" / "dense.onnx").unlink()
    with pytest.raises(MpdeployError, match="missing"):
        audit(root, AuditConfig(plots=False))


def test_not_an_engine_root(tmp_path):
    with pytest.raises(MpdeployError, match="not found"):
        audit(tmp_path / "missing", AuditConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MpdeployError, match="not an engine root"):
        audit(tmp_path / "empty", AuditConfig())


# ---------------------------------------------------------------------------------------------------
# report and CLI


def test_report_compares_two_audits(base_root, base_audit, scrambled_root, fast, tmp_path):
    from mpdeploy.audit.compare import ReportConfig, report

    if not (scrambled_root / "audit" / "audit.json").exists():
        audit(scrambled_root, AuditConfig(plots=False, **{**fast, "sensitivity_batch": 0}))
    out = report([base_root, scrambled_root], ReportConfig(out=tmp_path / "cmp" / "report.md"))
    md = out.read_text()
    assert "digits_cnn" in md and "scrambled" in md
    assert "| 2:4 |" in md and "| mp |" in md and "PASS" in md and "FAIL" in md
    assert "dense" in md  # the dense reference row
    png = out.with_suffix(".png")
    assert f"]({png.name})" in md and png.read_bytes()[:8] == PNG_MAGIC


def test_report_needs_audits(tmp_path):
    from mpdeploy.audit.compare import ReportConfig, report

    (tmp_path / "x" / "engine-ort").mkdir(parents=True)
    with pytest.raises(MpdeployError, match="mpdeploy audit"):
        report([tmp_path / "x"], ReportConfig(out=tmp_path / "r.md"))


# ---------------------------------------------------------------------------------------------------
# INT8: an engine that loses accuracy in both engines alike still fails (the fp32 gate)


def _int8_root(base: Path, tmp_path_factory, name: str, calib: np.ndarray) -> Path:
    """A copy of the base root whose engine pair is its fp32 pair quantized to INT8 Q/DQ by mpdeploy's
    own quantize_int8 (what `mpdeploy export --precision int8` runs), calibrated on `calib`."""
    from mpdeploy.onnx.precision import quantize_int8

    root = tmp_path_factory.mktemp(name) / name
    shutil.copytree(base / "pruned", root / "pruned")
    shutil.copytree(base / "onnx", root / "onnx")
    (root / "engine-ort").mkdir()
    batches = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    for variant in ("sparse", "dense"):
        quantize_int8(base / "engine-ort" / f"{variant}.onnx", root / "engine-ort" / f"{variant}.onnx", "input",
                      batches)
    _write_engine_manifest(root, tuple(calib.shape[1:]), 10, "int8")
    return root


@pytest.fixture(scope="module")
def int8_audits(base_root, fast, tmp_path_factory) -> dict[str, dict]:
    """Audits of two INT8 builds of the same pruned CNN: calibrated on its digits calibration images, and
    (the planted fault) on those images times 50: activation ranges 50x too wide, so INT8's steps swallow
    the signal in the dense and the sparse engine alike, and their comparison with each other sees little."""
    from mpdeploy.models.data import digits_tensors

    x = digits_tensors((1, 32, 32), "calib")[0].numpy()
    config = AuditConfig(plots=False, **{**fast, "sensitivity_batch": 0})
    out = {}
    for name, calib in (("int8_good", x), ("int8_bad_calibration", x * 50)):
        root = _int8_root(base_root, tmp_path_factory, name, calib)
        out[name] = json.loads((audit(root, config) / "audit.json").read_text())
    return out


def test_int8_engine_that_loses_accuracy_fails_the_audit(int8_audits, fast):
    a = int8_audits["int8_bad_calibration"]
    gate = a["thresholds"]["fp32_gate"]
    assert gate["precision"] == "int8" and gate["metric"] == "top1_drop_vs_fp32"
    assert gate["top1_fp32"] > 0.9 and gate["value"] > 0.10, gate  # many points lost against fp32
    assert a["passed"] is False
    assert any(f.startswith("top-1 drop against the fp32 dense model") for f in a["failures"]), a["failures"]


def test_int8_engine_calibrated_on_its_data_passes_the_fp32_gate(int8_audits, base_audit, fast):
    a = int8_audits["int8_good"]
    gate = a["thresholds"]["fp32_gate"]
    assert gate["images"] == a["accuracy"]["images"] == 539
    # the fp32 reference is the dense model's PyTorch top-1: the fp32 audit's dense engine scores the same
    assert gate["top1_fp32"] == pytest.approx(base_audit["summary"]["top1_dense"], abs=1e-9)
    assert gate["value"] <= fast["max_top1_drop"], gate
    assert a["passed"] is True, a["failures"]
    assert base_audit["thresholds"]["fp32_gate"] is None  # fp32 engines: the PyTorch reference check instead


@pytest.fixture
def cli_main(monkeypatch):
    # Only this stage's commands: the parser imports every command module, others may be mid-work.
    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in ("audit", "report")})
    return cli.main


def test_cli_exit_codes(cli_main, base_root, tmp_path, capsys):
    # Gates chosen so the verdict does not depend on the subset: accuracy always passes (drop <= 100%),
    # speed fails only when asked for an impossible 1000x.
    fast = ["--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--no-plots", "--sensitivity-batch", "0",
            "--max-eval-images", "64", "--max-top1-drop", "1.0"]
    assert cli_main(["-q", "audit", str(base_root), *fast]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS") and str(base_root / "audit") in out
    assert cli_main(["-q", "audit", str(base_root), *fast, "--min-speedup", "1000"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "failed: speedup at batch 1" in out
    for bad in (tmp_path / "missing", tmp_path):
        assert cli_main(["-q", "audit", str(bad), *fast]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mpdeploy audit: error:")
    assert cli_main(["audit", str(base_root), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    target = tmp_path / "report.md"
    assert cli_main(["-q", "report", str(base_root), "--out", str(target)]) == 0
    assert target.is_file() and str(target) in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "missing"), "--out", str(target)]) == 2


@pytest.mark.slow
def test_audit_of_a_real_build(tmp_path, monkeypatch, capsys):
    """The whole pipeline (prune -> export -> build -> audit) through the CLI, on the build engineer's code."""
    out = tmp_path / "digits_cnn"
    assert cli.main(["-q", "build", "zoo:digits_cnn", "--sparse", "--backend", "ort", "--budget", "mp",
                     "--target-mac-reduction", "0.1", "--out", str(out)]) == 0
    a = json.loads((out / "audit" / "audit.json").read_text())
    assert a["schema"] == SCHEMA and a["backend"] == "ort"
    assert a["weights"]["checked"] >= 1 and a["weights"]["violations"] == []
    assert a["engine_vs_pytorch"]["sparse"]["relative"] < 1e-3
    assert cli.main(["-q", "audit", str(out), "--max-top1-drop", "1.0", "--repeats", "2", "--no-plots"]) == 0

"""mpdeploy export: ONNX that carries its sparsity, checked by our TensorRT-rule checker, by Polygraphy's
own `inspect sparsity` checker, and by ONNX Runtime against PyTorch.

Default run: resnet18, vit_tiny_patch16_224, convnext_atto (random init, 2:4 uniform) and timm's tiny
test models. `slow` (`-m slow`): vit_base_patch16_224, resnet50, convnextv2_base, and the dynamo exporter
on vit_tiny_patch16_224; with MPDEPLOY_EXPORT_RESULTS=FILE they also write their numbers to FILE.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("timm")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sparsity_helpers import ours, polygraphy_check  # noqa: E402

from mpdeploy import cli  # noqa: E402
from mpdeploy.core import artifacts  # noqa: E402
from mpdeploy.core.errors import MpdeployError  # noqa: E402
from mpdeploy.export import stage as export_mod  # noqa: E402
from mpdeploy.export.stage import ExportConfig, export, load_sparsity  # noqa: E402
from mpdeploy.onnx.annotate import per_tensor_metadata_supported  # noqa: E402
from mpdeploy.onnx.initializers import Mapped, map_initializers  # noqa: E402
from mpdeploy.onnx.trt_rules import check_trt_sparsity, nm_compliant_along  # noqa: E402
from mpdeploy.models.spec import ModelSpec  # noqa: E402
from mpdeploy.models.load import load_model
from mpdeploy.sparsity.patterns import NM  # noqa: E402
from mpdeploy.prune.stage import PruneConfig, prune  # noqa: E402
from mpdeploy.sparsity.pruned import load_pruned  # noqa: E402

SMALL = ["resnet18", "vit_tiny_patch16_224", "convnext_atto"]
BIG = ["vit_base_patch16_224", "resnet50", "convnextv2_base"]
POLYGRAPHY_CLI = Path(sys.executable).with_name("polygraphy")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def polygraphy_runs():
    """`polygraphy inspect sparsity` runs started in the background (the check is pure Python and slow:
    it overlaps with the next export); killed at the end if still running."""
    runs: dict[Path, tuple[subprocess.Popen, Path]] = {}
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_polygraphy(runs: dict, model_path: Path) -> None:
    if model_path in runs or not POLYGRAPHY_CLI.exists():
        return
    # Beside the artifact folder, not in it: an artifact holding an unlisted file is refused.
    log = model_path.parent.with_name(f"{model_path.parent.name}-{model_path.name}.polygraphy.log")
    with open(log, "w") as f:
        # super_verbose prints each candidate's PruneInfo(name, axis): Polygraphy's placement decision.
        proc = subprocess.Popen([str(POLYGRAPHY_CLI), "inspect", "sparsity", str(model_path), "--verbosity",
                                 "super_verbose"], stdout=f, stderr=subprocess.STDOUT)
    runs[model_path] = (proc, log)


def polygraphy_cli_result(runs: dict, model_path: Path) -> tuple[dict[str, int], set[str], str]:
    """({tensor: axis} Polygraphy checked, tensors it found sparse, its log) from the real command."""
    if not POLYGRAPHY_CLI.exists():
        pytest.skip(f"no polygraphy command beside {sys.executable}")
    start_polygraphy(runs, model_path)
    proc, log = runs[model_path]
    assert proc.wait(timeout=1800) == 0, log.read_text()[-3000:]
    text = log.read_text()
    axes = {name: int(axis) for name, axis in re.findall(r"PruneInfo\(name='(.*?)', axis=(\d+)\)", text)}
    sparse = set(re.findall(r"Found sparse tensor: (\S+)", text))
    dense = set(re.findall(r"Found non-sparse tensor: (\S+)", text))
    count = int(re.search(r"Found: (\d+) weight tensor\(s\) eligible", text).group(1))
    assert len(sparse | dense) == count, "could not parse Polygraphy's log"
    return {name: axes[name] for name in sparse | dense}, sparse, text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, polygraphy_runs):
    """Prune / export each (model, options) once per module; returns (pruned_dir, onnx_dir)."""
    root = tmp_path_factory.mktemp("export")
    pruned_cache: dict = {}
    onnx_cache: dict = {}

    def get(model: str, exporter: str = "legacy", pattern: str = "2:4", tome: int = 0, **export_kw):
        pkey = (model, pattern, tome)
        if pkey not in pruned_cache:
            folder = root / f"{model}-{pattern.replace(':', 'of')}-tome{tome}" / "pruned"
            loaded = load_model(ModelSpec(f"timm:{model}", weights="random"))
            prune(loaded, PruneConfig(pattern=pattern, budget="uniform", tome=tome), folder)
            pruned_cache[pkey] = folder
        okey = (pkey, exporter, tuple(sorted(export_kw.items())))
        if okey not in onnx_cache:
            out = pruned_cache[pkey].parent / f"onnx-{exporter}-{len(onnx_cache)}"
            start = time.perf_counter()
            export(pruned_cache[pkey], ExportConfig(exporter=exporter, **export_kw), out)
            onnx_cache[okey] = out
            (out.parent / f"{out.name}.seconds").write_text(f"{time.perf_counter() - start:.2f}")
            if model in SMALL and exporter == "legacy" and not tome and not export_kw:
                start_polygraphy(polygraphy_runs, out / "model.onnx")
        return pruned_cache[pkey], onnx_cache[okey]

    return get


# ---------------------------------------------------------------------------------------------------
# helpers


def sparse_layers(pruned_dir: Path) -> dict[str, dict]:
    manifest = json.loads((pruned_dir / "manifest.json").read_text())
    return {r["param"]: r for r in manifest["layers"] if r["runs_sparse"]}


def assert_export_ok(pruned_dir: Path, onnx_dir: Path) -> dict:
    """The export contract on one artifact; returns its sparsity.json."""
    record = load_sparsity(onnx_dir)  # verifies the manifest hashes too
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["kind"] == "onnx"
    assert manifest["inputs"] == {"pruned_manifest": artifacts.sha256_file(pruned_dir / "manifest.json")}
    assert {"model.onnx", "model.dense.onnx", "sparsity.json"} <= set(manifest["files"])
    assert record["schema"] == "mpdeploy.sparsity/1"

    # Every layer the manifest calls 2:4 is annotated, eligible and 2:4 by TensorRT's rules.
    by_param = {t["param"]: t for t in record["tensors"]}
    for param, layer in sparse_layers(pruned_dir).items():
        t = by_param[param]
        assert t["eligible"] and t["is_2_4"] and t["nm_compliant"], (param, t)
        assert t["consumer_op"] in ("Conv", "MatMul", "Gemm")
    assert record["summary"]["ineligible"] == []
    assert record["summary"]["eligible_2_4"] == len(sparse_layers(pruned_dir)) > 0

    # ONNX Runtime matches PyTorch for both files.
    assert record["ort_check"]["max_abs_diff_sparse"] < 1e-4
    assert record["ort_check"]["max_abs_diff_dense"] < 1e-4

    # Our checker, re-run on the written file, says the same as the record.
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    report = check_trt_sparsity(proto)
    for t in record["tensors"]:
        assert report[t["initializer"]]["eligible"] == t["eligible"]
        assert report[t["initializer"]]["is_2_4"] == t["is_2_4"]

    # I/O names and the dynamic batch axis.
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # Annotations: model-level JSON and per-initializer metadata_props.
    meta = {p.key: p.value for p in proto.metadata_props}
    header = json.loads(meta["mpdeploy.sparsity"])
    assert header["source_pruned_manifest_sha256"] == manifest["inputs"]["pruned_manifest"]
    assert set(header["tensors"]) == {t["initializer"] for t in record["tensors"]}
    if per_tensor_metadata_supported():
        inits = {i.name: i for i in proto.graph.initializer}
        for t in record["tensors"]:
            props = {p.key: p.value for p in inits[t["initializer"]].metadata_props}
            assert props == {"mpdeploy.nm_pattern": t["pattern"], "mpdeploy.nm_axis": str(t["annotation_axis"]),
                             "mpdeploy.param": t["param"]}
    dense_meta = {p.key: p.value for p in onnx.load(str(onnx_dir / "model.dense.onnx")).metadata_props}
    assert json.loads(dense_meta["mpdeploy.sparsity"])["variant"] == "dense"

    assert_name_map(pruned_dir, proto, record)
    return record


def assert_name_map(pruned_dir: Path, proto, record: dict) -> None:
    """Each annotated initializer holds its PyTorch parameter: equal, transposed, or (folded BatchNorm)
    scaled per output channel with the same name."""
    state = load_pruned(pruned_dir).model.state_dict()
    inits = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in proto.graph.initializer}
    assert len({t["initializer"] for t in record["tensors"]}) == len(record["tensors"])  # one-to-one
    for t in record["tensors"]:
        param = state[t["param"]].float().numpy()
        onnx_value = inits[t["initializer"]]
        if "transposed" in t["map_method"]:
            onnx_value = onnx_value.T
        if t["map_method"].startswith("value-scaled"):
            assert t["initializer"] == t["param"], t  # scaled matches are only ever seen under the real name
            flat_p, flat_w = param.reshape(len(param), -1), onnx_value.reshape(len(param), -1)
            pivot = np.abs(flat_p).argmax(1)
            scale = flat_w[np.arange(len(param)), pivot] / np.where(
                flat_p[np.arange(len(param)), pivot] == 0, 1, flat_p[np.arange(len(param)), pivot])
            np.testing.assert_allclose(flat_w, scale[:, None] * flat_p, rtol=1e-5, atol=1e-6)
        else:
            assert t["map_method"] in ("value", "value-transposed"), t
            np.testing.assert_array_equal(onnx_value, param)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    finally:
        # cli.main points logging at the captured stderr; later tests must not log into a closed stream.
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------
# real models, default run


@pytest.mark.parametrize("model", SMALL)
def test_export_small_model(workspace, model):
    pruned_dir, onnx_dir = workspace(model)
    record = assert_export_ok(pruned_dir, onnx_dir)
    assert record["exporter"] == "legacy" and record["opset"] == 18


@pytest.mark.slow  # the default suite keeps under 10 minutes on 2 cores
def test_dynamo_exporter_resnet(workspace):
    """dynamo folds BatchNorm into the conv weights: the map falls back to per-channel scaled values."""
    pruned_dir, onnx_dir = workspace("resnet18", exporter="dynamo")
    record = assert_export_ok(pruned_dir, onnx_dir)
    assert record["exporter"] == "dynamo"
    assert {t["map_method"] for t in record["tensors"]} == {"value-scaled"}
    assert not list(onnx_dir.glob("*.data"))  # external_data=False below 2 GB


def test_dynamo_exporter_vit(workspace):
    """dynamo renames MatMul weights (val_N) and stores them transposed: the map finds them by value.
    (timm's tiny test ViT here; vit_tiny_patch16_224 in the slow run.)"""
    pruned_dir, onnx_dir = workspace("test_vit", exporter="dynamo")
    record = assert_export_ok(pruned_dir, onnx_dir)
    methods = {t["map_method"] for t in record["tensors"]}
    assert methods == {"value-transposed"}
    assert any(not t["initializer"].endswith(".weight") for t in record["tensors"])  # renamed
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    poly_checked, poly_sparse = polygraphy_check(proto)
    assert (poly_checked, poly_sparse) == ours(proto)


@pytest.mark.slow
def test_dynamo_exporter_vit_tiny(workspace):
    pruned_dir, onnx_dir = workspace("vit_tiny_patch16_224", exporter="dynamo")
    record = assert_export_ok(pruned_dir, onnx_dir)
    assert {t["map_method"] for t in record["tensors"]} == {"value-transposed"}
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    assert polygraphy_check(proto) == ours(proto)


def test_tome_vit_export(workspace):
    pytest.importorskip("mpdeploy.sparsity.tome", reason="mpdeploy.sparsity.tome (token merging) is not available")
    pruned_dir, onnx_dir = workspace("vit_tiny_patch16_224", tome=8)
    record = assert_export_ok(pruned_dir, onnx_dir)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["tome"]["r"] and set(manifest["tome"]["r"]) == {8}
    assert record["ort_check"]["batches"] == [2, 1]


# ---------------------------------------------------------------------------------------------------
# options, on timm's tiny test models


def test_audit_only_pattern(workspace):
    """8:16 has no sparse tensor core path: recorded audit-only, its N:M compliance still checked."""
    pruned_dir, onnx_dir = workspace("test_convnext", pattern="8:16")
    record = load_sparsity(onnx_dir)
    assert record["tensors"] and record["summary"]["runs_sparse"] == 0
    for t in record["tensors"]:
        assert t["pattern"] == "8:16" and t["nm_compliant"]
        assert t["reason"].startswith("audit-only (no sparse tensor core path)")
    assert record["summary"]["ineligible"] == []


def test_fp16_static_batch(workspace):
    pruned_dir, onnx_dir = workspace("test_vit", fp16=True, dynamic_batch=False)
    record = load_sparsity(onnx_dir)
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {i.name: i for i in proto.graph.initializer}
    for t in record["tensors"]:
        assert inits[t["initializer"]].data_type == TensorProto.FLOAT16
        assert t["eligible"] and t["is_2_4"], t
    assert record["fp16_weights"] and record["ort_check"]["batches"] == [1]
    assert record["ort_check"]["max_abs_diff_sparse"] < 1e-4
    assert polygraphy_check(proto) == ours(proto)  # both look through the Cast


def test_external_data(workspace, tmp_path, monkeypatch):
    """Models over the protobuf limit keep weights in model.onnx.data (limit lowered to test it)."""
    pruned_dir, _ = workspace("test_resnet")
    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 1 << 20)
    out = export(pruned_dir, ExportConfig(), tmp_path / "onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.onnx.data", "model.dense.onnx.data"} <= set(manifest["files"])
    record = load_sparsity(out)
    assert record["summary"]["eligible_2_4"] == len(sparse_layers(pruned_dir))
    assert record["ort_check"]["max_abs_diff_sparse"] < 1e-4


def test_ineligible_layers_refused_or_recorded(workspace, tmp_path, monkeypatch):
    pruned_dir, _ = workspace("test_resnet")
    real = export_mod.check_trt_sparsity

    def one_ineligible(proto):
        report = real(proto)
        name = sorted(k for k, v in report.items() if v["eligible"] and v["is_2_4"])[0]
        report[name] = {**report[name], "eligible": False, "reason": "reaches Conv through Reshape (test)"}
        return report

    monkeypatch.setattr(export_mod, "check_trt_sparsity", one_ineligible)
    with pytest.raises(MpdeployError, match="not 2:4-eligible.*--allow-ineligible"):
        export(pruned_dir, ExportConfig(), tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
    out = export(pruned_dir, ExportConfig(allow_ineligible=True), tmp_path / "allowed")
    record = load_sparsity(out)
    assert len(record["summary"]["ineligible"]) == 1
    assert "Reshape (test)" in record["summary"]["ineligible"][0]["reason"]


def test_config_validation():
    with pytest.raises(MpdeployError, match="exporter"):
        ExportConfig(exporter="tf2onnx")
    with pytest.raises(MpdeployError, match="opset"):
        ExportConfig(opset=7)
    with pytest.raises(MpdeployError, match="batch"):
        ExportConfig(check_batch=0)


# ---------------------------------------------------------------------------------------------------
# the CLI and bad input


def test_cli_export_default_out(workspace, tmp_path, capsys):
    pruned_src, _ = workspace("test_resnet")
    pruned = tmp_path / "engines" / "m" / "pruned"
    pruned.parent.mkdir(parents=True)
    shutil.copytree(pruned_src, pruned)
    rc, out, err = run_cli(["-q", "export", str(pruned)], capsys)
    assert rc == 0, err
    assert (tmp_path / "engines" / "m" / "onnx" / "model.onnx").is_file()
    assert out.count("\n") == 1 and "2:4-eligible" in out and "ONNX Runtime" in out


@pytest.fixture
def tiny_copy(workspace, tmp_path):
    pruned_src, _ = workspace("test_resnet")
    pruned = tmp_path / "pruned"
    shutil.copytree(pruned_src, pruned)
    return pruned


def _assert_refused(rc, err, out_dir: Path, expect: str):
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(expect, lines[0]), lines[0]
    assert not out_dir.exists()
    parent = out_dir.parent
    if parent.is_dir():
        assert not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cli_missing_artifact(tmp_path, capsys):
    out = tmp_path / "onnx"
    rc, _, err = run_cli(["export", str(tmp_path / "nope"), "--out", str(out)], capsys)
    _assert_refused(rc, err, out, "not found")


def test_cli_truncated_weights(tiny_copy, tmp_path, capsys):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "onnx"
    rc, _, err = run_cli(["export", str(tiny_copy), "--out", str(out)], capsys)
    _assert_refused(rc, err, out, "model.safetensors does not match the hash")


def test_cli_manifest_hash_mismatch(tiny_copy, tmp_path, capsys):
    manifest = json.loads((tiny_copy / "manifest.json").read_text())
    manifest["files"]["dense.safetensors"] = "0" * 64
    (tiny_copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "onnx"
    rc, _, err = run_cli(["export", str(tiny_copy), "--out", str(out)], capsys)
    _assert_refused(rc, err, out, "dense.safetensors does not match the hash")


def test_cli_unwritable_out(tiny_copy, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "onnx"
    rc, _, err = run_cli(["export", str(tiny_copy), "--out", str(out)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder" and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_failed_check_leaves_nothing(tiny_copy, tmp_path, capsys):
    """A check that fails after files were written (atol impossibly small) keeps no half artifact."""
    out = tmp_path / "onnx"
    rc, _, err = run_cli(["-q", "export", str(tiny_copy), "--out", str(out), "--atol", "1e-30"], capsys)
    _assert_refused(rc, err, out, "differs from PyTorch")


def test_cli_out_overlapping_input(tiny_copy, capsys):
    rc, _, err = run_cli(["export", str(tiny_copy), "--out", str(tiny_copy)], capsys)
    assert rc == 2 and "overlaps" in err and (tiny_copy / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------
# the checker on hand-built graphs (each also put to Polygraphy)


def _24(shape, axis, seed=0):
    """Random tensor, 2:4 along `axis` (two zeros in every aligned group of 4)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(w, axis, -1).copy()
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    groups[..., 1:3] = 0
    return np.moveaxis(groups.reshape(moved.shape), -1, axis).copy()


def _model(nodes, inits, inputs, output="y"):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) if isinstance(a, np.ndarray) else a for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _conv(w):
    return _model([helper.make_node("Conv", ["x", "W"], ["y"])], {"W": w}, [("x", [1, w.shape[1], 8, 8])])


def test_checker_conv_axis1():
    report = check_trt_sparsity(_conv(_24((16, 8, 3, 3), axis=1)))
    assert report["W"]["eligible"] and report["W"]["is_2_4"] and report["W"]["axis"] == 1
    assert polygraphy_check(_conv(_24((16, 8, 3, 3), axis=1))) == ({"W": 1}, {"W"})


def test_checker_conv_axis0_only_is_not_24():
    w = _24((16, 8, 3, 3), axis=0)
    assert nm_compliant_along(w, 0, NM(2, 4)) and not nm_compliant_along(w, 1, NM(2, 4))
    report = check_trt_sparsity(_conv(w))
    assert report["W"]["eligible"] and not report["W"]["is_2_4"]
    assert polygraphy_check(_conv(w)) == ({"W": 1}, set())


def test_checker_conv_channels_not_multiple_of_4():
    report = check_trt_sparsity(_conv(np.zeros((16, 3, 3, 3), np.float32)))
    assert not report["W"]["eligible"] and "not a multiple of 4" in report["W"]["reason"]
    assert polygraphy_check(_conv(np.zeros((16, 3, 3, 3), np.float32))) == ({}, set())


def test_checker_matmul_b_through_transpose():
    w = _24((32, 16), axis=1)  # PyTorch Linear layout [out, in], 2:4 along `in`
    m = _model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                helper.make_node("MatMul", ["x", "Wt"], ["y"])],
               {"W": w}, [("x", [4, 16])])
    report = check_trt_sparsity(m)
    assert report["W"]["eligible"] and report["W"]["is_2_4"] and report["W"]["axis"] == 1
    assert report["W"]["path"] == ["Transpose"]
    assert polygraphy_check(m) == ({"W": 1}, {"W"})


def test_checker_matmul_b_direct():
    w = _24((16, 32), axis=0)  # [K, N], 2:4 along K
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": w}, [("x", [4, 16])])
    assert check_trt_sparsity(m)["W"]["is_2_4"]
    assert polygraphy_check(m) == ({"W": 0}, {"W"})


def test_checker_matmul_through_reshape_is_ineligible():
    w = _24((16, 32), axis=0)
    shape = np.array([16, 32], np.int64)
    m = _model([helper.make_node("Reshape", ["W", "shape"], ["Wr"]), helper.make_node("MatMul", ["x", "Wr"], ["y"])],
               {"W": w, "shape": shape}, [("x", [4, 16])])
    report = check_trt_sparsity(m)
    assert not report["W"]["eligible"] and "Reshape" in report["W"]["reason"]
    assert polygraphy_check(m) == ({}, set())


def test_checker_gemm_transb():
    w = _24((32, 16), axis=1)  # [N, K] with transB=1
    m = _model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"W": w}, [("x", [4, 16])])
    report = check_trt_sparsity(m)
    assert report["W"]["axis"] == 1 and report["W"]["eligible"] and report["W"]["is_2_4"]
    assert polygraphy_check(m) == ({"W": 1}, {"W"})
    m0 = _model([helper.make_node("Gemm", ["x", "W"], ["y"])], {"W": _24((16, 32), axis=0)}, [("x", [4, 16])])
    assert check_trt_sparsity(m0)["W"]["axis"] == 0 and check_trt_sparsity(m0)["W"]["is_2_4"]
    # 2:4 along the wrong axis for transB=1 is not 2:4 to TensorRT.
    m1 = _model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"W": _24((32, 16), axis=0)}, [("x", [4, 16])])
    assert not check_trt_sparsity(m1)["W"]["is_2_4"]


def test_checker_sees_through_cast_and_dq_but_not_int8():
    w16 = numpy_helper.from_array(_24((16, 8, 3, 3), axis=1).astype(np.float16), "W")
    m = _model([helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
                helper.make_node("Conv", ["x", "Wf"], ["y"])],
               {"W": w16}, [("x", [1, 8, 8, 8])])
    report = check_trt_sparsity(m)
    assert report["W"]["eligible"] and report["W"]["is_2_4"] and report["W"]["dtype"] == "FP16"
    assert polygraphy_check(m) == ({"W": 1}, {"W"})
    w8 = numpy_helper.from_array((_24((16, 8, 3, 3), axis=1) * 10).astype(np.int8), "W")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    m8 = _model([helper.make_node("DequantizeLinear", ["W", "s"], ["Wf"]),
                 helper.make_node("Conv", ["x", "Wf"], ["y"])],
                {"W": w8, "s": scale}, [("x", [1, 8, 8, 8])])
    report = check_trt_sparsity(m8)
    assert not report["W"]["eligible"] and "INT8" in report["W"]["reason"]
    assert polygraphy_check(m8) == ({}, set())  # Polygraphy skips non-float weights too


def test_checker_identity_is_ineligible_like_polygraphy():
    m = _model([helper.make_node("Identity", ["W"], ["Wi"]), helper.make_node("Conv", ["x", "Wi"], ["y"])],
               {"W": _24((16, 8, 3, 3), axis=1)}, [("x", [1, 8, 8, 8])])
    assert "Identity" in check_trt_sparsity(m)["W"]["reason"]
    assert polygraphy_check(m) == ({}, set())


def test_checker_transpose_axis_follows_perm():
    """A 4-D weight stored [O, kh, kw, I] and transposed to [O, I, kh, kw]: C_in is axis 3 of the
    initializer (perm[1]). Polygraphy maps the axis with perm.index(axis) instead, which is the same only
    for self-inverse perms: it checks axis 2 (kw = 3, not a multiple of 4) and skips the weight. This is
    the one disagreement found; docs/export.md records it."""
    w = _24((16, 3, 3, 8), axis=3)
    m = _model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[0, 3, 1, 2]),
                helper.make_node("Conv", ["x", "Wt"], ["y"])],
               {"W": w}, [("x", [1, 8, 8, 8])])
    report = check_trt_sparsity(m)
    assert report["W"]["axis"] == 3 and report["W"]["eligible"] and report["W"]["is_2_4"]
    from polygraphy.logger import G_LOGGER
    from polygraphy.tools.sparse import SparsityPruner

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        pruner = SparsityPruner(m)
        pruner._walk_nodes()
    assert pruner.prune_infos["W"].axis == 2, "Polygraphy now follows perm[axis]: update docs/export.md"


def test_checker_matmul_constant_a_not_eligible():
    m = _model([helper.make_node("MatMul", ["W", "x"], ["y"])], {"W": _24((16, 32), axis=1)}, [("x", [32, 4])])
    report = check_trt_sparsity(m)
    assert not report["W"]["eligible"] and "input A" in report["W"]["reason"]
    # Polygraphy checks a constant A along axis 1 and calls it sparse: a documented disagreement.
    assert polygraphy_check(m) == ({"W": 1}, {"W"})


def test_name_map_ambiguity_names_the_layer():
    w = np.zeros((8, 8), np.float32)
    m = _model([], {"a": w, "b": w.copy()}, [("x", [1])])
    with pytest.raises(MpdeployError, match="layer blocks.0.fc"):
        map_initializers(m, {"blocks.0.fc.weight": w}, {"blocks.0.fc.weight": "blocks.0.fc"})
    m2 = _model([], {"blocks.0.fc.weight": w, "b": w.copy()}, [("x", [1])])
    mapped = map_initializers(m2, {"blocks.0.fc.weight": w}, {})
    assert mapped["blocks.0.fc.weight"].initializer == "blocks.0.fc.weight"  # the name breaks the tie


def test_name_map_folded_batchnorm():
    """Per-channel scaled values map (BatchNorm folded); an all-zero weight (gamma = 0) is not taken
    when a weight with values matches."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    p[:, 1::2] = 0
    scale = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    m = _model([], {"zeros": np.zeros_like(p), "folded": p * scale[:, None, None, None]}, [("x", [1])])
    mapped = map_initializers(m, {"conv.weight": p}, {})
    assert mapped["conv.weight"] == Mapped("folded", False, "value-scaled")
    with pytest.raises(MpdeployError, match="no ONNX initializer holds the pruned weight of conv"):
        map_initializers(_model([], {"other": p + 1}, [("x", [1])]), {"conv.weight": p},
                                    {"conv.weight": "conv"})


def test_name_map_by_name_only_warns(caplog):
    """An initializer whose values differ from the parameter (the exporter rewrote it some other way)
    but whose name and shape match is taken by name, with a warning (this path used to raise NameError)."""
    p = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    m = _model([], {"conv.weight": p + 1}, [("x", [1])])
    with caplog.at_level("WARNING", logger="mpdeploy.onnx.initializers"):
        mapped = map_initializers(m, {"conv.weight": p}, {})
    assert mapped["conv.weight"].initializer == "conv.weight" and mapped["conv.weight"].method == "name"
    assert "matched by name only" in caplog.text


# ---------------------------------------------------------------------------------------------------
# the real Polygraphy command on the small models (last: its background runs overlap the tests above)


@pytest.mark.parametrize("model", SMALL)
def test_polygraphy_agrees_with_checker(workspace, polygraphy_runs, model):
    """The real `polygraphy inspect sparsity` command: every tensor the manifest calls 2:4 is reported
    sparse, and Polygraphy and our checker pick the same tensors, along the same axes, with the same
    verdicts."""
    pruned_dir, onnx_dir = workspace(model)
    poly_checked, poly_sparse, log = polygraphy_cli_result(polygraphy_runs, onnx_dir / "model.onnx")
    our_eligible, our_sparse = ours(onnx.load(str(onnx_dir / "model.onnx")))
    assert poly_checked == our_eligible
    assert poly_sparse == our_sparse
    record = load_sparsity(onnx_dir)
    wanted = {t["initializer"] for t in record["tensors"] if t["runs_sparse"]}
    assert wanted and wanted <= poly_sparse
    assert "Identity is unsupported" not in log  # the export drops Identity in front of weights


# ---------------------------------------------------------------------------------------------------
# big models (slow)


def _record_result(model: str, data: dict) -> None:
    target = os.environ.get("MPDEPLOY_EXPORT_RESULTS")
    if not target:
        return
    path = Path(target)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("machine", {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "tool_versions": artifacts.tool_versions(), "torch_threads": torch.get_num_threads(),
    })
    results.setdefault("models", {})[model] = data
    path.write_text(json.dumps(results, indent=2) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("model", BIG)
def test_big_model_export_and_polygraphy(workspace, model):
    pruned_dir, onnx_dir = workspace(model)
    record = assert_export_ok(pruned_dir, onnx_dir)
    proto = onnx.load(str(onnx_dir / "model.onnx"))
    start = time.perf_counter()
    poly_checked, poly_sparse = polygraphy_check(proto)
    poly_seconds = time.perf_counter() - start
    our_eligible, our_sparse = ours(proto)
    wanted = {t["initializer"] for t in record["tensors"] if t["runs_sparse"]}
    assert wanted <= poly_sparse
    assert poly_checked == our_eligible and poly_sparse == our_sparse
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    _record_result(model, {
        "exporter": record["exporter"], "opset": record["opset"],
        "annotated_tensors": record["summary"]["annotated"],
        "eligible_2_4": record["summary"]["eligible_2_4"],
        "polygraphy_sparse": len(poly_sparse), "polygraphy_checked": len(poly_checked),
        "checker_polygraphy_agree": True,
        "ort_max_abs_diff_sparse": record["ort_check"]["max_abs_diff_sparse"],
        "ort_max_abs_diff_dense": record["ort_check"]["max_abs_diff_dense"],
        "ort_batches": record["ort_check"]["batches"],
        "export_seconds": float((onnx_dir.parent / f"{onnx_dir.name}.seconds").read_text()),
        "stage_timings_s": {k: round(v, 2) for k, v in manifest["timings"].items()},
        "polygraphy_check_seconds": round(poly_seconds, 2),
        "onnx_bytes": (onnx_dir / "model.onnx").stat().st_size,
    })

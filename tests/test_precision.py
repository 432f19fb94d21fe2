"""Export by precision (fp16 / bf16 / int8 Q/DQ), the ONNX graph pitfalls of the build report, and the
TensorRT argument plan for both API generations (10 with legacy flags, 11 without): all on CPU.

The converted files are checked against known answers: zeros exactly where the FP32 weights had them,
our checker and Polygraphy's `inspect sparsity` agreeing tensor by tensor (Polygraphy looking through
Q/DQ and Cast), INT8 weights symmetric per channel with the folded INT8 values still 2:4, and ONNX
Runtime (BF16: onnx's reference evaluator) output against the FP32 model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sparsity_helpers import ours, polygraphy_check

from mpdeploy.backends.base import BuildConfig, BuildInputs, create_backend
from mpdeploy.backends.trt.plan import TRT10, TRT11, TrtCapabilities, plan_trt_build
from mpdeploy.onnx.qdq import qdq_graph_findings
from mpdeploy.core.errors import MpdeployError
from mpdeploy.export.stage import ExportConfig, export, load_sparsity
from mpdeploy.core.kinds import OnnxFolder
from mpdeploy.onnx.precision import quantized_weight, weight_quantization
from mpdeploy.onnx.trt_rules import check_trt_sparsity, nm_compliant_along, tensor_array
from mpdeploy.sparsity.patterns import NM


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(model, precision): onnx_dir} from the real prune + export of timm's tiny test models (2:4 uniform)."""
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.models.load import load_model
    from mpdeploy.prune.stage import PruneConfig, prune

    root = tmp_path_factory.mktemp("precision")
    cache: dict = {}

    def get(model: str, precision: str) -> tuple[Path, Path]:
        pruned = root / model / "pruned"
        if not pruned.exists():
            torch.manual_seed(0)
            prune(load_model(ModelSpec(f"timm:{model}", weights="random")), PruneConfig(pattern="2:4", budget="uniform"),
                  pruned)
        if (model, precision) not in cache:
            cache[(model, precision)] = export(pruned, ExportConfig(precision=precision, calib="synthetic",
                                                                    calib_images=32), root / model / precision)
        return pruned, cache[(model, precision)]

    return get


def _pruned_tensors(record: dict) -> list[dict]:
    return [t for t in record["precision"]["tensors"] if t["runs_sparse"]]


# ---------------------------------------------------------------------------------------------------
# the converted files


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_int8_qdq_keeps_2_4_and_polygraphy_sees_through(exported, model):
    _, onnx_dir = exported(model, "int8")
    record = load_sparsity(onnx_dir)
    assert record["precision"]["files"] == {"sparse": "model.int8.onnx", "dense": "model.dense.int8.onnx"}
    proto = onnx.load(str(onnx_dir / "model.int8.onnx"))
    pruned = _pruned_tensors(record)
    assert pruned and all(t["is_2_4"] and t["eligible"] for t in pruned)
    assert all("QuantizeLinear" in t["path"] and "DequantizeLinear" in t["path"] for t in pruned)

    # Polygraphy and our checker agree tensor by tensor; every pruned tensor is sparse to Polygraphy.
    assert polygraphy_check(proto) == ours(proto)
    assert {t["converted_initializer"] for t in pruned} <= polygraphy_check(proto)[1]

    # Symmetric per-channel weights: zero-point 0, one scale per output channel, INT8 values still 2:4
    # with zeros exactly where the FP32 weights are zero.
    quant = weight_quantization(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    for t in pruned:
        name = t["converted_initializer"]
        assert quant[name]["symmetric"] and quant[name]["channels"] > 1, quant[name]
        fp32 = tensor_array(inits[name])
        q = quantized_weight(proto, name)
        axis = check_trt_sparsity(proto)[name]["axis"]
        assert nm_compliant_along(q, axis, NM(2, 4))
        assert ((fp32 == 0) <= (q == 0)).all()  # a zero never becomes nonzero

    # Layout TensorRT fuses: constant weight -> Q -> DQ -> op, and quantized outputs (no findings).
    findings = record["precision"]["graph_findings"]
    assert findings["quantized_weights"] and not findings["unfusable_qdq"]
    assert not findings["unquantized_outputs"], findings["unquantized_outputs"]

    # The recorded ONNX Runtime check, recomputed on its own input (seeded N(0,1)): the record is what ORT
    # gives, and the INT8 file really moved the logits (it is not the fp32 file). How far INT8 may move
    # them is a question for trained models: random-init tiny ones have near-tied logits (test_vit's
    # INT8 error is half its largest logit), so accuracy is tested on the zoo models below.
    import onnxruntime as ort

    check = record["precision"]["ort_check"]["sparse"]
    shape = json.loads((onnx_dir / "manifest.json").read_text())["model"]["input_shape"]
    x = np.random.default_rng(0).standard_normal((check["batch"], *shape)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref, got = (ort.InferenceSession(str(onnx_dir / f), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                for f in ("model.onnx", "model.int8.onnx"))
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    assert check["run"] and check["max_abs_diff_vs_fp32"] == pytest.approx(diff, rel=1e-6)
    assert diff > 0


def test_polygraphy_command_reports_every_pruned_tensor_sparse_in_the_int8_file(exported):
    """The real `polygraphy inspect sparsity` command on the INT8 Q/DQ file (it looks through Q/DQ)."""
    import re
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("polygraphy")
    # polygraphy is a declared dependency: its command missing is a broken install, not a reason to skip
    assert cli.exists(), f"no polygraphy command beside {sys.executable}; reinstall (pip install -e .)"
    _, onnx_dir = exported("test_resnet", "int8")
    run = subprocess.run([str(cli), "inspect", "sparsity", str(onnx_dir / "model.int8.onnx")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    reported = set(re.findall(r"Found sparse tensor: (\S+)", run.stdout + run.stderr))
    pruned = {t["converted_initializer"] for t in _pruned_tensors(load_sparsity(onnx_dir))}
    assert pruned and pruned <= reported


@pytest.mark.parametrize("precision,onnx_type", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_fp16_bf16_cast_keeps_zeros_and_2_4(exported, precision, onnx_type):
    _, onnx_dir = exported("test_resnet", precision)
    record = load_sparsity(onnx_dir)
    proto = onnx.load(str(onnx_dir / OnnxFolder.model_name("sparse", precision)))
    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_dir / "model.onnx")).graph.initializer}
    inits = {t.name: t for t in proto.graph.initializer}
    pruned = _pruned_tensors(record)
    assert pruned
    for t in pruned:
        tensor = inits[t["converted_initializer"]]
        assert tensor.data_type == onnx_type
        assert np.array_equal(tensor_array(tensor) == 0, fp32[t["initializer"]] == 0)  # zeros exactly preserved
        assert t["is_2_4"] and t["eligible"]
    # Compute in the low precision: no FP32 islands, graph I/O still FP32.
    assert qdq_graph_findings(proto)["fp32_islands"] == []
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    poly_checked, poly_sparse = polygraphy_check(proto)
    our_checked, our_sparse = ours(proto)
    assert poly_checked == our_checked  # the same tensors along the same axes
    if precision == "fp16":
        assert poly_sparse == our_sparse
    else:
        # Polygraphy's BF16 path (process_bf16_tensor, 0.53.6) indexes raw data with a loop variable its
        # inner loop shadows, so it reads the wrong elements and calls every 2:4 BF16 tensor non-sparse.
        # Our verdict is checked independently: BF16 bits -> FP32 values, 2:4 along the same axis.
        assert poly_sparse == set(), "Polygraphy now reads BF16 right: require agreement, update docs/export.md"
        for name in our_sparse:
            bits = np.frombuffer(inits[name].raw_data, np.uint16).astype(np.uint32) << 16
            values = bits.view(np.float32).reshape(tuple(inits[name].dims))
            assert nm_compliant_along(values, our_checked[name], NM(2, 4))


def test_fp16_runs_on_ort_and_bf16_on_the_reference_evaluator(exported):
    from onnx.reference import ReferenceEvaluator

    _, fp16_dir = exported("test_resnet", "fp16")
    assert load_sparsity(fp16_dir)["precision"]["ort_check"]["sparse"]["max_abs_diff_vs_fp32"] < 5e-3
    _, bf16_dir = exported("test_resnet", "bf16")
    bf16 = load_sparsity(bf16_dir)["precision"]
    assert not bf16["ort_check"]["sparse"]["run"] and "Conv" in bf16["ort_check"]["sparse"]["reason"]
    import onnxruntime as ort

    shape = [2, *json.loads((bf16_dir / "manifest.json").read_text())["model"]["input_shape"]]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(str(bf16_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ReferenceEvaluator(str(bf16_dir / "model.bf16.onnx")).run(None, {"input": x})[0]
    scale = np.abs(ref).max()
    assert np.abs(got.astype(np.float32) - ref).max() < 0.05 * scale + 1e-3


def test_ort_backend_runs_fp16_and_int8_files(exported, tmp_path):
    pruned, onnx_dir = exported("test_resnet", "int8")
    backend = create_backend("ort")
    built = backend.build(BuildInputs(onnx_dir=onnx_dir, pruned_dir=pruned), "sparse", tmp_path,
                          BuildConfig(precision="int8"))
    assert built.report["source"] == "model.int8.onnx" and "Q/DQ" in built.report["precision_note"]
    assert built.report["max_abs_diff_vs_export"] == 0.0  # copied as exported
    with pytest.raises(MpdeployError, match="bf16.*--backend trt"):
        backend.build(BuildInputs(onnx_dir=onnx_dir), "sparse", tmp_path, BuildConfig(precision="bf16"))
    with pytest.raises(MpdeployError, match="model.fp16.onnx not found.*--precision fp16"):
        backend.build(BuildInputs(onnx_dir=onnx_dir), "sparse", tmp_path / "x", BuildConfig(precision="fp16"))


def test_export_refuses_bad_precision_options():
    with pytest.raises(MpdeployError, match="unknown precision 'fp8'"):
        ExportConfig(precision="fp8")
    with pytest.raises(MpdeployError, match="calibration images"):
        ExportConfig(precision="int8", calib_images=0)


# ---------------------------------------------------------------------------------------------------
# graph pitfalls on hand-built graphs


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _graph(nodes, inits, out_type=TensorProto.FLOAT, in_shape=(1, 8, 8, 8), opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", out_type, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _qdq(name, scale="s"):
    return [helper.make_node("QuantizeLinear", [name, scale], [f"{name}_q"], name=f"{name}_Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", scale], [f"{name}_dq"], name=f"{name}_DQ")]


SCALARS = {"s": np.array(0.05, np.float32)}


def test_findings_weights_quantized_but_output_not():
    nodes = [*_qdq("x"), *_qdq("W"), helper.make_node("Conv", ["x_dq", "W_dq"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    findings = qdq_graph_findings(_graph(nodes, {"W": _w((16, 8, 3, 3)), **SCALARS}))
    assert findings["quantized_weights"] == ["conv"] and findings["unquantized_outputs"] == ["conv"]
    assert any("no quantized output" in w and "Model-Optimizer#1664" in w for w in findings["warnings"])
    # With Q/DQ after the Relu epilogue the output is quantized: no finding.
    nodes = nodes[:-1] + [helper.make_node("Relu", ["c"], ["r"], name="relu"), *_qdq("r")]
    nodes[-1].output[0] = "y"
    assert qdq_graph_findings(_graph(nodes, {"W": _w((16, 8, 3, 3)), **SCALARS}))["unquantized_outputs"] == []


def test_findings_unfusable_qdq_placements():
    # DQ -> Reshape -> MatMul: TensorRT fuses constant -> DQ -> op only.
    nodes = [*_qdq("W"), helper.make_node("Reshape", ["W_dq", "shape"], ["Wr"], name="reshape"),
             helper.make_node("MatMul", ["x", "Wr"], ["m"], name="mm"), *_qdq("m")]
    nodes[-1].output[0] = "y"
    findings = qdq_graph_findings(_graph(nodes, {"W": _w((16, 32)), "shape": np.array([16, 32]), **SCALARS},
                                         in_shape=(4, 16)))
    assert [f["node"] for f in findings["unfusable_qdq"]] == ["mm"] and "Reshape" in findings["unfusable_qdq"][0]["reason"]
    # Q/DQ between a Conv and its BatchNormalization.
    bn = {k: np.ones(16, np.float32) for k in ("g", "b", "mean", "var")}
    nodes = [*_qdq("W"), helper.make_node("Conv", ["x", "W_dq"], ["c"], name="conv"), *_qdq("c"),
             helper.make_node("BatchNormalization", ["c_dq", "g", "b", "mean", "var"], ["y"], name="bn")]
    findings = qdq_graph_findings(_graph(nodes, {"W": _w((16, 8, 3, 3)), **bn, **SCALARS}))
    assert any(f["node"] == "bn" and "BatchNormalization" in f["reason"] for f in findings["unfusable_qdq"])
    # A Conv weight DQ fed by a non-constant tensor; the same on a MatMul is an activation x activation
    # product (attention), which is not a weight and not a finding.
    nodes = [*_qdq("x"), helper.make_node("Conv", ["x", "x_dq"], ["y"], name="conv")]
    findings = qdq_graph_findings(_graph(nodes, dict(SCALARS)))
    assert findings["unfusable_qdq"] and "constant" in findings["unfusable_qdq"][0]["reason"]
    nodes = [*_qdq("x"), helper.make_node("MatMul", ["x", "x_dq"], ["y"], name="mm")]
    assert qdq_graph_findings(_graph(nodes, dict(SCALARS), in_shape=(8, 8)))["quantized_weights"] == []


def test_findings_fp32_island_in_a_low_precision_graph():
    w16 = _w((16, 8, 3, 3)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in_cast"),
             helper.make_node("Conv", ["x16", "W"], ["c"], name="conv"),
             helper.make_node("Cast", ["c"], ["c32"], to=TensorProto.FLOAT, name="up"),
             helper.make_node("Softmax", ["c32"], ["y"], name="softmax_fp32")]
    findings = qdq_graph_findings(_graph(nodes, {"W": w16}))
    assert findings["fp32_islands"] == ["softmax_fp32"]
    assert any("stay FP32" in w for w in findings["warnings"])
    # An all-FP32 graph has no islands (nothing to be an island in).
    assert qdq_graph_findings(_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="c")],
                                     {"W": _w((16, 8, 3, 3))}))["fp32_islands"] == []


# ---------------------------------------------------------------------------------------------------
# TensorRT argument plan: TensorRT 10 (legacy flags present) and 11 (removed)


@pytest.mark.parametrize("caps", [TRT10, TRT11], ids=["trt10", "trt11"])
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_strongly_typed_plan_is_the_same_on_10_and_11(caps, precision):
    sparse = plan_trt_build("sparse", precision, "strong", caps)
    dense = plan_trt_build("dense", precision, "strong", caps)
    assert sparse.network == {"strongly_typed": True} and sparse.typing == "strong"
    assert sparse.config == {"sparse_weights": True} and dense.config == {"sparse_weights": False}
    assert sparse.onnx_precision == precision and not sparse.calibrator
    assert OnnxFolder.model_name("sparse", sparse.onnx_precision) == f"model.{precision}.onnx"


def test_legacy_flags_only_where_tensorrt_has_them():
    plan = plan_trt_build("sparse", "int8", "legacy", TRT10)
    assert plan.network == {"strongly_typed": False} and plan.onnx_precision == "fp32"
    assert plan.config == {"sparse_weights": True, "int8": True, "fp16": True} and plan.calibrator
    assert plan_trt_build("dense", "fp16", "legacy", TRT10).config == {"sparse_weights": False, "fp16": True}
    assert plan_trt_build("sparse", "bf16", "legacy", TRT10).config == {"sparse_weights": True, "bf16": True}
    for precision, flag in (("fp16", "FP16"), ("bf16", "BF16"), ("int8", "INT8")):
        with pytest.raises(MpdeployError, match=f"no BuilderFlag.{flag}.*typing=strong"):
            plan_trt_build("sparse", precision, "legacy", TRT11)
    no_calibrator = TrtCapabilities("10.99", True, True, frozenset({"FP16", "INT8"}), int8_calibrator=False)
    with pytest.raises(MpdeployError, match="int8_calibrator"):
        plan_trt_build("sparse", "int8", "legacy", no_calibrator)
    # fp32 never needs flags: strongly typed from model.onnx on both generations.
    assert plan_trt_build("sparse", "fp32", "legacy", TRT11).config == {"sparse_weights": True}


def test_unsupported_tensorrt_is_refused_in_one_line():
    old = TrtCapabilities("8.6.1", strongly_typed=False, sparse_weights=True,
                          precision_flags=frozenset({"FP16", "INT8"}), int8_calibrator=True)
    with pytest.raises(MpdeployError, match=r"TensorRT 8.6.1 is not supported \(it lacks "
                                            r"NetworkDefinitionCreationFlag.STRONGLY_TYPED\).*tensorrt>=10,<12") as exc:
        plan_trt_build("sparse", "fp16", "strong", old)
    assert "\n" not in str(exc.value)
    newer = plan_trt_build("sparse", "fp16", "strong", TrtCapabilities("12.0.0", True, True))
    assert any("newer" in n for n in newer.notes)


# ---------------------------------------------------------------------------------------------------
# INT8 accuracy on the zoo's digits models (shipped weights: the same model on every machine)

# mpdeploy's INT8 promise (docs/reproducibility.md): on a model that is accurate in fp32, ONNX Runtime INT8
# Q/DQ (symmetric per channel, MinMax calibration on the pruned artifact's calibration images) loses at
# most 1 point of top-1. Tested where it means something: the zoo's dense models and digits_vit's 2:4
# model (91.65% in fp32). Not on digits_cnn's 2:4 model: 2:4 without distillation leaves it at 48.61%,
# where INT8's rounding moves many small margins; an INT8 engine of it fails the audit's fp32 gate instead
# (tests/test_audit.py::test_int8_engine_that_loses_accuracy_fails_the_audit plants that fault).
# Measured here (correct of 539, fp32 -> int8): digits_cnn dense 534 -> 533; digits_vit dense 503 -> 506,
# 2:4 494 -> 492. Weights, calibration and ORT on one thread are deterministic: the margin (at least 3
# images) is fixed, not statistical.
INT8_PROMISE = [("digits_cnn", "dense"), ("digits_vit", "dense"), ("digits_vit", "2:4")]


@pytest.fixture(scope="module")
def zoo_int8(tmp_path_factory):
    """{zoo: (onnx dir, digits test images, labels)}: the shipped model pruned 2:4 on digits calibration,
    exported with INT8 Q/DQ files for the 2:4 model and its dense twin."""
    from mpdeploy.models.data import digits_tensors
    from mpdeploy.prune.stage import PruneConfig, prune
    from mpdeploy.models.zoo import load_zoo_model

    cache = {}

    def get(zoo: str):
        if zoo not in cache:
            root = tmp_path_factory.mktemp(zoo)
            loaded = load_zoo_model(zoo)
            prune(loaded, PruneConfig(pattern="2:4", calib="digits"), root / "pruned")
            onnx_dir = export(root / "pruned", ExportConfig(precision="int8"), root / "onnx")
            x, y = digits_tensors(tuple(loaded.input_shape), "test")
            cache[zoo] = (onnx_dir, x.numpy().astype(np.float32), y.numpy())
        return cache[zoo]

    return get


def _correct(path: Path, x: np.ndarray, y: np.ndarray) -> int:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return int((session.run(None, {"input": x})[0].argmax(1) == y).sum())


@pytest.mark.parametrize("zoo,variant", INT8_PROMISE)
def test_int8_top1_within_one_point_of_fp32_on_accurate_models(zoo_int8, zoo, variant):
    from mpdeploy.models.zoo import zoo_entry

    onnx_dir, x, y = zoo_int8(zoo)
    record = load_sparsity(onnx_dir)["precision"]
    assert record["calibration"]["source"] == "digits"
    assert record["calibration"]["chosen_because"] == "the pruned artifact's calibration source"
    fp32, int8 = ("model.dense.onnx", "model.dense.int8.onnx") if variant == "dense" else ("model.onnx",
                                                                                             "model.int8.onnx")
    base, quant = _correct(onnx_dir / fp32, x, y), _correct(onnx_dir / int8, x, y)
    if variant == "dense":  # ORT's fp32 dense model is the shipped zoo model: its recorded score, exactly
        assert base == round(zoo_entry(zoo).test_top1 * len(y))
    assert base >= 0.9 * len(y), "the promise is for accurate models: this one is not"
    assert 100.0 * (base - quant) / len(y) <= 1.0, (zoo, variant, base, quant)


def test_cli_export_precision(exported, tmp_path, capsys):
    import logging

    from mpdeploy import cli

    pruned, _ = exported("test_resnet", "fp16")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        rc = cli.main(["-q", "export", str(pruned), "--out", str(tmp_path / "onnx"), "--precision", "fp16"])
    finally:
        root.handlers[:] = handlers  # cli.main points logging at the captured stderr
        root.setLevel(level)
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n") == 1
    assert "model.fp16.onnx" in out and "ORT top-1 agreement with fp32" in out
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and {"model.fp16.onnx", "model.dense.fp16.onnx"} <= set(manifest["files"])

"""Backends: ort end to end on CPU; torch and trt on what needs no GPU (their real runs skip without one)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpdeploy.backends.base import BuildConfig, BuildInputs, create_backend, resolve_backend
from mpdeploy.core.errors import MpdeployError

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SM80 = HAS_CUDA and torch.cuda.get_device_capability(0) >= (8, 0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """pruned/ + onnx/ of timm's tiny test_vit (random init, seeded), made by the real prune and export."""
    from mpdeploy.export.stage import ExportConfig, export
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.models.load import load_model
    from mpdeploy.prune.stage import PruneConfig, prune

    root = tmp_path_factory.mktemp("artifact")
    torch.manual_seed(0)
    loaded = load_model(ModelSpec("timm:test_vit", weights="random"))
    prune(loaded, PruneConfig(), root / "pruned")
    export(root / "pruned", ExportConfig(), root / "onnx")
    return root


def _sample(root: Path, batch: int = 3) -> np.ndarray:
    from mpdeploy.core.artifacts import read_manifest

    shape = read_manifest(root / "onnx", "onnx", verify=False)["model"]["input_shape"]
    return np.random.default_rng(1).standard_normal((batch, *shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# choosing a backend


@pytest.mark.skipif(HAS_CUDA or HAS_TRT, reason="auto picks a GPU backend on this machine")
def test_auto_picks_ort_and_says_why_the_others_were_skipped():
    name, why = resolve_backend("auto")
    assert name == "ort"
    assert "onnxruntime" in why and "CPUExecutionProvider" in why
    assert "skipped trt: TensorRT is not installed" in why
    assert "torch: no CUDA device" in why


@pytest.mark.skipif(HAS_TRT and HAS_CUDA, reason="TensorRT is usable here")
def test_asking_for_an_unusable_backend_is_a_user_error():
    with pytest.raises(MpdeployError, match="backend 'trt' is not usable here: TensorRT is not installed.*--backend"):
        resolve_backend("trt")
    with pytest.raises(MpdeployError, match="unknown backend 'tensorflow'"):
        resolve_backend("tensorflow")


def test_build_config_options_and_profile():
    config = BuildConfig(batch_sizes=(32, 1, 8, 8), backend_options={"kernel": "cutlass"}.items())
    assert config.batch_sizes == (1, 8, 32) and config.profile_batches == (1, 8, 32)
    assert config.option("kernel") == "cutlass"
    assert "threads" not in config.build_fields()
    with pytest.raises(MpdeployError, match="has no option kernel"):
        create_backend("ort").resolve_options(config)
    with pytest.raises(MpdeployError, match="kernel='cublas' is not one of cusparselt, cutlass"):
        create_backend("torch").resolve_options(BuildConfig(backend_options=(("kernel", "cublas"),)))


# ---------------------------------------------------------------------------------------------------
# ort


@pytest.fixture(scope="module")
def ort_engines(artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine-ort")
    backend = create_backend("ort")
    for variant in ("sparse", "dense"):
        built = backend.build(BuildInputs(onnx_dir=artifact / "onnx", pruned_dir=artifact / "pruned"), variant, out,
                              BuildConfig())
        assert built.file == f"{variant}.onnx"
        (out / f"{variant}.report.json").write_text(json.dumps(built.report))
    return out


def test_ort_engine_matches_onnxruntime_and_pytorch(artifact, ort_engines):
    import onnxruntime as ort

    from mpdeploy.sparsity.pruned import load_pruned

    backend = create_backend("ort")
    x = _sample(artifact)
    for variant, onnx_file in (("sparse", "model.onnx"), ("dense", "model.dense.onnx")):
        report = json.loads((ort_engines / f"{variant}.report.json").read_text())
        assert report["max_abs_diff_vs_export"] < 1e-5
        assert report["eligible_2_4_tensors_in_engine"] == report["eligible_2_4_tensors_in_export"]
        with backend.load(ort_engines / f"{variant}.onnx", BuildConfig(threads=1)) as runner:
            assert runner.providers == ["CPUExecutionProvider"]
            got = runner.run(x)
            times = runner.time(x, 3)
        direct = ort.InferenceSession(str(artifact / "onnx" / onnx_file), providers=["CPUExecutionProvider"])
        expected = direct.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        model = load_pruned(artifact / "pruned", variant).model
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
        assert len(times) == 3 and all(t > 0 for t in times)
    assert json.loads((ort_engines / "sparse.report.json").read_text())["eligible_2_4_tensors_in_engine"] > 0


def test_ort_threads_and_device_info(ort_engines):
    backend = create_backend("ort")
    with backend.load(ort_engines / "sparse.onnx", BuildConfig(threads=1)) as runner:
        assert runner.session.get_session_options().intra_op_num_threads == 1
    info = backend.device_info()
    assert info["gpu"] is None and info["tensorrt_version"] is None
    assert info["onnxruntime_version"] and info["cpu"]
    assert "no 2:4 sparse kernels" in info["note"]
    assert set(info["fingerprint"]) == {"onnxruntime_version"}


def test_ort_precisions(artifact, tmp_path):
    backend = create_backend("ort")
    inputs = BuildInputs(onnx_dir=artifact / "onnx")
    with pytest.raises(MpdeployError, match="FP32 weights.*--precision fp32"):
        backend.build(inputs, "sparse", tmp_path, BuildConfig(precision="fp16"))
    with pytest.raises(MpdeployError, match="does not build int8.*--backend trt"):
        backend.build(inputs, "sparse", tmp_path, BuildConfig(precision="int8"))


def test_ort_no_optimization_copies_the_export(artifact, tmp_path):
    built = create_backend("ort").build(BuildInputs(onnx_dir=artifact / "onnx"), "dense", tmp_path,
                                        BuildConfig(backend_options=(("optimization", "none"),)))
    assert (tmp_path / built.file).read_bytes() == (artifact / "onnx" / "model.dense.onnx").read_bytes()


# ---------------------------------------------------------------------------------------------------
# torch (conversion planning runs on CPU; the real conversion needs an sm_80+ GPU)


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().reshape(weight.shape[0], -1, 4)
    keep = w.abs().topk(2, dim=-1).indices
    return (w * torch.zeros_like(w).scatter_(-1, keep, 1.0)).reshape(weight.shape)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_ok = nn.Linear(128, 64)  # 2:4, multiple of the cuSPARSELt fp16 tiles (16, 16)
        self.fc_dense = nn.Linear(128, 64)  # not pruned
        self.fc_odd = nn.Linear(120, 40)  # 2:4 but 40 rows: not a multiple of 16 (nor CUTLASS's 32)
        self.pw_big = nn.Conv2d(256, 256, 1)  # 2:4 1x1 conv, large enough
        self.pw_small = nn.Conv2d(64, 64, 1)  # 2:4 1x1 conv, small
        self.conv3 = nn.Conv2d(64, 64, 3)
        with torch.no_grad():
            for m in (self.fc_ok, self.fc_odd, self.pw_big, self.pw_small):
                m.weight.copy_(_two_four(m.weight))


def test_torch_conversion_plan_on_cpu():
    from mpdeploy.backends.torch_sparse import plan_conversion, shape_constraints, weight_problem

    plan = {e["name"]: e for e in plan_conversion(_Net(), "cusparselt", "fp16", conv1x1="large")}
    assert plan["fc_ok"]["convert"] and plan["fc_ok"]["reason"] is None
    assert not plan["fc_dense"]["convert"] and "not 2:4" in plan["fc_dense"]["reason"]
    assert not plan["fc_odd"]["convert"] and "[40, 120]" in plan["fc_odd"]["reason"]
    assert plan["pw_big"]["convert"] and plan["pw_big"]["kind"] == "conv1x1"
    assert not plan["pw_small"]["convert"] and "below 256" in plan["pw_small"]["reason"]
    assert not plan["conv3"]["convert"] and "linear/mm/addmm only" in plan["conv3"]["reason"]
    every = {e["name"]: e for e in plan_conversion(_Net(), "cutlass", "fp16", conv1x1="all")}
    assert every["pw_small"]["convert"] and "(32, 64)" in every["fc_odd"]["reason"]
    assert not any(e["convert"] for e in plan_conversion(_Net(), "cusparselt", "fp16", conv1x1="off")
                   if e["kind"].startswith("conv"))
    # The limits come from torch's own table, per kernel and dtype.
    assert shape_constraints("cusparselt", "fp16") == (16, 16)
    assert shape_constraints("cutlass", "fp16") == (32, 64)
    assert shape_constraints("cusparselt", "fp32") is None
    assert "no fp32" in weight_problem(_Net().fc_ok.weight, "cusparselt", "fp32")


def test_torch_plan_for_pruning_leaves_out_the_pattern_check():
    # `prune --backend torch` asks the plan of the DENSE model: shape rules only, no "not 2:4" reason.
    from mpdeploy.backends.sparse_plan import sparse_plan
    from mpdeploy.backends.torch_sparse import plan_conversion

    net = _Net()
    plan = {e["name"]: e for e in plan_conversion(net, "cusparselt", "fp16", conv1x1="large", check_pattern=False)}
    assert plan["fc_dense"]["convert"]  # dense now, but torch would convert it once pruned
    assert not plan["fc_odd"]["convert"] and not plan["conv3"]["convert"] and not plan["pw_small"]["convert"]
    names = ["fc_ok", "fc_dense", "fc_odd", "pw_big", "pw_small", "conv3"]
    torch_plan = sparse_plan(net, (64, 8, 8), names, "torch")
    assert set(torch_plan.runs_dense) == {"fc_odd", "pw_small", "conv3"}
    assert all(why.startswith("torch runs it dense: ") for why in torch_plan.runs_dense.values())
    assert torch_plan.record()["settings"] == {"precision": "fp16", "kernel": "cusparselt", "conv1x1": "large"}
    assert set(sparse_plan(net, (64, 8, 8), names, "torch", options={"conv1x1": "all"}).runs_dense) == {"fc_odd", "conv3"}


def test_conv1x1_as_linear_matches_the_conv():
    # The reshaping the torch backend uses for 1x1 convs, checked dense on CPU (NCHW and channels_last in).
    from mpdeploy.backends.torch_sparse import conv1x1_as_linear_class

    conv = nn.Conv2d(256, 128, 1)
    wrapped = conv1x1_as_linear_class()(conv)
    x = torch.randn(2, 256, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), conv(x))
        torch.testing.assert_close(wrapped(x.contiguous(memory_format=torch.channels_last)), conv(x))


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_torch_backend_says_why_it_is_unavailable(artifact, tmp_path):
    from mpdeploy.backends.torch_sparse import TorchSparseBackend

    ok, why = TorchSparseBackend.availability()
    assert not ok and "no CUDA device" in why
    with pytest.raises(MpdeployError, match="not usable here: no CUDA device"):
        TorchSparseBackend().build(BuildInputs(artifact / "onnx", artifact / "pruned"), "sparse", tmp_path, BuildConfig())


def test_torch_precision_rules():
    from mpdeploy.backends.torch_sparse import TorchSparseBackend

    backend = TorchSparseBackend()
    with pytest.raises(MpdeployError, match="int8"):
        backend._precision(BuildConfig(precision="int8"), "cusparselt")
    with pytest.raises(MpdeployError, match="cuSPARSELt has no fp32"):
        backend._precision(BuildConfig(precision="fp32"), "cusparselt")
    assert backend._precision(BuildConfig(), "cusparselt") == "fp16"


@pytest.mark.gpu
@pytest.mark.skipif(not SM80, reason="needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores)")
@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
def test_torch_sparse_engine_on_gpu(artifact, tmp_path, kernel):
    from mpdeploy.sparsity.pruned import load_pruned

    backend = create_backend("torch")
    config = BuildConfig(backend_options=(("kernel", kernel),))
    inputs = BuildInputs(artifact / "onnx", artifact / "pruned")
    built = {v: backend.build(inputs, v, tmp_path, config) for v in ("sparse", "dense")}
    assert built["sparse"].report["converted_layers"]
    x = _sample(artifact, 8)
    for variant in ("sparse", "dense"):
        reference = load_pruned(artifact / "pruned", variant).model.eval()
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        with backend.load(tmp_path / built[variant].file, config) as runner:
            np.testing.assert_allclose(runner.run(x), expected, atol=5e-2)  # fp16 vs the fp32 module
            assert len(runner.time(x, 3)) == 3


# ---------------------------------------------------------------------------------------------------
# trt


def test_trt_availability_reason():
    from mpdeploy.backends.trt.backend import TrtBackend

    ok, why = TrtBackend.availability()
    if not HAS_TRT:
        assert not ok and why.startswith("TensorRT is not installed")


def test_trt_build_log_capture_keeps_polygraphy_off_stdout(capsys):
    # Polygraphy (no TensorRT needed) routes TensorRT's messages through G_LOGGER; the capture takes all
    # of them, verbose included, and nothing reaches stdout (no prints in the library).
    from polygraphy.logger import G_LOGGER

    from mpdeploy.backends.trt.backend import capture_build_log

    before = G_LOGGER.module_severity
    with capture_build_log() as lines:
        G_LOGGER.extra_verbose("(Sparsity) Layers eligible for sparse math: a, b")
        G_LOGGER.verbose("(Sparsity) TRT inference plan picked sparse implementation for layers: b")
    assert capsys.readouterr().out == ""
    from mpdeploy.backends.trt.report import parse_sparsity_log

    assert parse_sparsity_log("\n".join(lines)) == {"eligible": ["a", "b"], "picked_sparse": ["b"]}
    assert G_LOGGER.module_severity is before


@pytest.mark.trt
def test_trt_sparse_and_dense_engines(artifact, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (no wheel reachable here; use the Docker image)")
    if not SM80:
        pytest.skip("TensorRT sparse math needs a CUDA GPU with compute capability >= 8.0")
    from mpdeploy.export.stage import ExportConfig, export

    backend = create_backend("trt")
    config = BuildConfig(precision="fp16", batch_sizes=(1, 4, 8), timing_cache=tmp_path / "timing.cache")
    # TensorRT 10/11 build strongly typed networks from the FP16 ONNX (export --precision fp16).
    onnx_dir = export(artifact / "pruned", ExportConfig(precision="fp16"), tmp_path / "onnx-fp16")
    inputs = BuildInputs(onnx_dir, artifact / "pruned")
    sparse = backend.build(inputs, "sparse", tmp_path, config)
    assert sparse.report["onnx"] == "model.fp16.onnx" and sparse.report["network_flags"] == {"strongly_typed": True}
    dense = backend.build(inputs, "dense", tmp_path, config)
    assert sparse.report["eligible"] is not None and sparse.report["sparse_weights"]
    assert not dense.report["sparse_weights"]
    assert (tmp_path / "sparse.build.log").read_text() and json.loads((tmp_path / "sparse.layers.json").read_text())
    x = _sample(artifact, 4)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(artifact / "onnx" / "model.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with backend.load(tmp_path / sparse.file, config) as runner:
        np.testing.assert_allclose(runner.run(x), expected, atol=5e-2)
        assert len(runner.time(x, 3)) == 3


@pytest.mark.trt
def test_trt_strongly_typed_int8_qdq_engine(artifact, tmp_path):
    """INT8 from the Q/DQ export, strongly typed (no INT8 flag, no calibrator): TensorRT 10 and 11 alike."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (no wheel reachable here; use the Docker image)")
    if not SM80:
        pytest.skip("TensorRT sparse math needs a CUDA GPU with compute capability >= 8.0")
    from mpdeploy.export.stage import ExportConfig, export

    onnx_dir = export(artifact / "pruned", ExportConfig(precision="int8", calib="synthetic", calib_images=32),
                      tmp_path / "onnx-int8")
    config = BuildConfig(precision="int8", batch_sizes=(1, 4, 8), timing_cache=tmp_path / "timing.cache")
    built = create_backend("trt").build(BuildInputs(onnx_dir, artifact / "pruned"), "sparse", tmp_path, config)
    assert built.report["onnx"] == "model.int8.onnx" and built.report["typing"] == "strong"
    assert "int8" not in built.report["flags"] and built.report["calibration"] is None


def test_backends_import_without_gpu_libraries():
    # Heavy imports are lazy: importing every backend module pulls in neither tensorrt nor onnxruntime.
    import subprocess

    code = ("import sys; import mpdeploy.backends.trt.backend, mpdeploy.backends.ort, mpdeploy.backends.torch_sparse; "
            "print(sorted(m for m in ('tensorrt', 'onnxruntime', 'polygraphy.backend.trt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_torch_benchmark_dry_run_runs_on_cpu(tmp_path, capsys):
    """benchmarks/torch_sparse_speed.py imports and its CPU part (prune, conversion plan) runs; no latency."""
    spec = importlib.util.spec_from_file_location("torch_sparse_speed",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "torch_sparse_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dry.json"
    result = bench.main(["--dry-run", "--models", "test_vit", "--out", str(out)])
    entry = result["models"]["test_vit"]
    assert result["dry_run"] and "latency" not in entry
    assert entry["conversion"]["cusparselt"]["converted"]  # the pruned blocks' Linears
    assert json.loads(out.read_text())["machine"]["probes"]["ldconfig_nvinfer"]["cmd"] == "ldconfig -p | grep nvinfer"
    capsys.readouterr()

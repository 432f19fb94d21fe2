"""ONNX Runtime backend: runs on any machine (CPU), and on CUDA / TensorRT execution providers where present.

The "engine" is the exported ONNX, optimized offline at ORT's *basic* level (constant folding, Conv+BN
fusion: standard ONNX ops only, so the file stays portable and Triton's onnxruntime backend can serve it;
Conv+BN folding scales whole output channels, so 2:4 zeros stay zeros). Sessions then run at the full
optimization level. ONNX Runtime's CPU provider has no 2:4 sparse kernels: the sparse model runs the same
dense GEMMs over zeros, so on CPU sparse and dense take about the same time (the audit shows it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.backends.base import Backend, BuildConfig, BuildInputs, BuiltEngine, Runner, SparsePlan
from mpdeploy.backends.sparse_plan import tensorrt_rules_plan
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.machine import cpu_model
from mpdeploy.core.kinds import OnnxFolder
from mpdeploy.onnx.precision import require_precision_file

logger = logging.getLogger(__name__)

# Preference when present. The TensorRT EP can run 2:4 sparse math (trt_sparsity_enable); CUDA cannot.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU_NOTE = ("ONNX Runtime's CPU execution provider has no 2:4 sparse kernels: the sparse engine runs the same dense "
            "GEMMs as the dense twin (its zeros are multiplied like any other weight), so expect sparse ~= dense "
            "latency on CPU; the audit measures it")
PRUNE_NOTE = ("ONNX Runtime on CPU has no sparse kernels, so no layer runs sparse there; pruning for TensorRT's rules "
              "instead, as the target of a later GPU build")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MpdeployError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu, not both)") from None
    return onnxruntime


def _providers(ort, wanted: str) -> list[str]:
    available = set(ort.get_available_providers())
    if wanted == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in PROVIDER_ORDER if p in available]
    return chosen or ["CPUExecutionProvider"]


def _onnx_has_fp16_weights(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


class OrtRunner(Runner):
    def __init__(self, session, providers_requested: list[str]):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.providers_requested = providers_requested
        # What ONNX Runtime actually registered (a provider that fails to load falls back to CPU silently).
        self.providers = list(session.get_providers())

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def time(self, x: np.ndarray, iterations: int) -> list[float]:
        ort = _ort()
        x = np.ascontiguousarray(x, dtype=np.float32)
        on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        # Bind the input once (on the GPU for CUDA/TensorRT EPs): this times the session, not host copies.
        value = ort.OrtValue.ortvalue_from_numpy(x, "cuda" if on_gpu else "cpu", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, value)
        binding.bind_output(self.output_name, "cuda" if on_gpu else "cpu")
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.session.run_with_iobinding(binding)
            if on_gpu:
                binding.synchronize_outputs()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    default_precision = "fp32"
    options = {
        "optimization": ("basic", "none"),  # offline optimization saved as the engine file
        "providers": ("auto", "cpu"),  # auto: TensorRT EP > CUDA EP > CPU, whichever is installed
    }

    @classmethod
    def prune_plan(cls, model, input_shape, names: list[str], precision: str | None,
                   options: dict[str, Any]) -> SparsePlan:
        """No sparse kernels on CPU: TensorRT's rules, as the target of a later GPU build (said in the note)."""
        line = f"{cls.name}: {PRUNE_NOTE}"
        logger.info(line)
        plan = tensorrt_rules_plan(cls.name, model, input_shape, names)
        return dataclasses.replace(plan, note=line if not plan.note else f"{line}; {plan.note}")

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort

            providers = ort.get_available_providers()
        except Exception as exc:  # noqa: BLE001 - must not raise
            return False, f"onnxruntime does not import ({type(exc).__name__}: {exc})"
        runnable = [p for p in PROVIDER_ORDER if p in providers]
        return True, f"onnxruntime {ort.__version__} with {', '.join(runnable)}"

    def _source(self, onnx_dir: Path, variant: str, precision: str) -> tuple[Path, str | None]:
        """The ONNX this precision runs from, and a note on what the precision means here."""
        if precision == "fp32":
            return require_precision_file(onnx_dir, variant, "fp32"), None
        if precision == "bf16":
            raise MpdeployError(
                "the ort backend does not run bf16: ONNX Runtime's CPU provider has no BF16 Conv/pooling kernels "
                "(measured: NOT_IMPLEMENTED for Conv(22)); use --precision fp16|int8 with ort, or --backend trt"
            )
        converted = Path(onnx_dir) / OnnxFolder.model_name(variant, precision)
        if converted.is_file():
            if precision == "int8":
                return converted, ("int8 = the export's Q/DQ model (symmetric per-channel INT8 weights, calibrated INT8 "
                                   "activations); ONNX Runtime fuses Q/DQ into its INT8 kernels on CPU")
            return converted, ("fp16 = the export's FP16 model (weights and compute FP16, I/O FP32); ONNX Runtime's "
                               "CPU provider casts nodes it has no FP16 kernel for back to FP32")
        legacy = require_precision_file(onnx_dir, variant, "fp32")
        if precision == "fp16" and _onnx_has_fp16_weights(legacy):
            return legacy, ("fp16 = FP16 weight initializers behind Cast-to-FP32 (export --fp16); the CPU/CUDA "
                            "providers compute in FP32")
        if precision == "int8":
            raise MpdeployError(f"the ort backend does not build int8 engines from an FP32 export ({converted.name} not "
                                "found); re-run `mpdeploy export --precision int8` (calibrated Q/DQ), or use --backend trt")
        raise MpdeployError(f"{converted.name} not found and {legacy.name} has FP32 weights; re-run `mpdeploy export "
                            "--precision fp16`, or build with --precision fp32")

    def build(self, inputs: BuildInputs, variant: str, out_dir: Path, config: BuildConfig) -> BuiltEngine:
        ort = _ort()
        options = self.resolve_options(config)
        precision = self.resolve_precision(config)
        src, precision_note = self._source(Path(inputs.onnx_dir), variant, precision)
        dst = Path(out_dir) / f"{variant}.onnx"
        external = src.with_name(src.name + ".data").exists()
        t0 = time.perf_counter()
        # A converted file is kept as exported: offline folding would turn FP32 weight -> Q into INT8
        # initializers and change the layout TensorRT and Triton read; sessions optimize it at load anyway.
        if options["optimization"] == "none" or src.name != OnnxFolder.model_name(variant, "fp32"):
            shutil.copyfile(src, dst)
            if external:
                shutil.copyfile(src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))
            level = "none (copied as exported)"
        else:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(dst)
            so.log_severity_level = 3
            if external:  # >2 GB models: keep the weights beside the optimized graph
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                            f"{dst.name}.data")
            # CPU only: an optimization pass for another provider could bake provider-specific nodes into the file.
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
            level = "basic (ORT_ENABLE_BASIC, saved; standard ONNX ops)"
        seconds = time.perf_counter() - t0
        report: dict[str, Any] = {
            "source": src.name,
            "offline_optimization": level,
            "runtime_optimization": "ORT_ENABLE_ALL (in the session, not saved)",
            "precision": precision,
            "precision_note": precision_note,
            "optimize_seconds": seconds,
        }
        report.update(self._check_engine(src, dst))
        with self.load(dst, config) as runner:  # which providers a session of this engine really gets here
            report["providers_requested"] = runner.providers_requested
            report["providers_registered"] = runner.providers
        return BuiltEngine(file=dst.name, report=report)

    def _check_engine(self, src: Path, dst: Path) -> dict[str, Any]:
        """The saved engine still computes what the export did, and its 2:4 weights survived optimization."""
        import onnx

        from mpdeploy.onnx.trt_rules import check_trt_sparsity

        def eligible_24(path: Path) -> int:
            return sum(v["eligible"] and v["is_2_4"] for v in check_trt_sparsity(onnx.load(str(path))).values())

        ort = _ort()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        a = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in a.get_inputs()[0].shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ya = a.run(None, {a.get_inputs()[0].name: x})[0]
        yb = b.run(None, {b.get_inputs()[0].name: x})[0]
        return {
            "max_abs_diff_vs_export": float(np.abs(ya.astype(np.float64) - yb).max()),
            "eligible_2_4_tensors_in_export": eligible_24(src),
            "eligible_2_4_tensors_in_engine": eligible_24(dst),
        }

    def load(self, engine_path: Path, config: BuildConfig) -> Runner:
        ort = _ort()
        options = self.resolve_options(config)
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise MpdeployError(f"ONNX Runtime engine {engine_path} not found; run mpdeploy build")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if config.threads:
            so.intra_op_num_threads = int(config.threads)
        providers = _providers(ort, options["providers"])
        sparse = engine_path.name.startswith("sparse")
        precision = self.resolve_precision(config)
        provider_args: list[Any] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                # The TensorRT EP finds 2:4 from zeros like TensorRT itself; sparse math needs FP16/INT8.
                provider_args.append((p, {"trt_sparsity_enable": sparse, "trt_fp16_enable": precision != "fp32",
                                          "trt_int8_enable": precision == "int8"}))
            else:
                provider_args.append(p)
        session = ort.InferenceSession(str(engine_path), so, providers=provider_args)
        runner = OrtRunner(session, providers)
        if runner.providers != providers:
            logger.warning("ONNX Runtime registered %s (asked for %s)", runner.providers, providers)
        return runner

    def device_info(self) -> dict[str, Any]:
        ort = _ort()
        providers = _providers(ort, "auto")
        gpu = None
        if providers[0] != "CPUExecutionProvider":
            try:
                import torch

                gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            except Exception:  # noqa: BLE001 - device naming is best effort
                gpu = None
        info = {
            "name": "cuda:0" if gpu else "cpu",
            "gpu": gpu,
            "tensorrt_version": None,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime_version": ort.__version__,
            "providers_available": list(ort.get_available_providers()),
            "providers_preferred": providers,
            "note": CPU_NOTE if providers[0] == "CPUExecutionProvider" else None,
        }
        # The saved engine is a basic-level (portable) ONNX: only the ONNX Runtime version shapes it.
        info["fingerprint"] = {"onnxruntime_version": info["onnxruntime_version"]}
        return info

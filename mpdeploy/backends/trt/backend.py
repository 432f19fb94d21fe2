"""TensorRT backend through Polygraphy's Python API (NetworkFromOnnxPath -> CreateConfig -> engine bytes).

Written for TensorRT 10 and 11 (`tensorrt>=10,<12`). Both build strongly typed networks: the precision is
the ONNX's own (`model.fp16.onnx`, `model.bf16.onnx`, the INT8 Q/DQ `model.int8.onnx` from
`mpdeploy export --precision`), so the same call works on 11, which removed the FP16/INT8/BF16 builder
flags and the INT8 calibrator. The legacy path (FP32 ONNX + precision flags + IInt8 calibrator) is the
backend option typing=legacy, allowed only where the installed TensorRT still has those features
(`trt_plan.detect_capabilities`). An older TensorRT is refused with one line.

TensorRT finds 2:4 from the zeros in dense weights, so the sparse engine is built from the sparse ONNX
with SPARSE_WEIGHTS on, and its dense twin from the dense ONNX with it off. Each build is logged verbosely
(Polygraphy's G_LOGGER routed into Python logging, captured per build into `<variant>.build.log`), and the
engine inspector's JSON is kept as `<variant>.layers.json`; `trt_report` turns both, and the ONNX graph,
into the eligible / picked-sparse lists and named pitfalls. A tactic timing cache (per GPU and TensorRT
version) lives under `calib/cache/`.

Needs TensorRT and a CUDA GPU; neither exists on the development machines, so this module is written
against the real APIs (Polygraphy 0.53 read for argument names) and its builder tests skip without them;
the argument translation (`trt_plan`) is tested on CPU for both API generations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.backends.base import Backend, BuildConfig, BuildInputs, BuiltEngine, Runner, SparsePlan
from mpdeploy.backends.sparse_plan import tensorrt_rules_plan
from mpdeploy.backends.trt.plan import detect_capabilities, plan_trt_build, unsupported_reason
from mpdeploy.backends.trt.report import (
    layer_not_sparse_reasons,
    parse_engine_inspector,
    parse_sparsity_log,
    pitfall_warnings,
)
from mpdeploy.core.artifacts import sha256_file
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import OnnxFolder
from mpdeploy.onnx.precision import require_precision_file

logger = logging.getLogger(__name__)

CACHE_DIR = Path("calib/cache")
CALIB_BATCHES = 16


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise MpdeployError(
            "TensorRT is not installed; use the project's Docker image (NVIDIA TensorRT base) or "
            "`pip install tensorrt` on a GPU host, or pick --backend ort"
        ) from None
    return tensorrt


@contextlib.contextmanager
def capture_build_log() -> Iterator[list[str]]:
    """Collect every TensorRT / Polygraphy message of the block (verbose included) into a list.

    Polygraphy's TensorRT logger forwards TensorRT's INFO as G_LOGGER.verbose and VERBOSE as
    extra_verbose; routing G_LOGGER through Python logging keeps it off stdout (no prints in the library)
    and lets one handler capture the lot. Warnings and errors also go to this module's logger.
    """
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []

    class _Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            lines.append(message)
            if record.levelno >= logging.WARNING:
                logger.warning("TensorRT: %s", message)

    saved = (G_LOGGER.module_severity, G_LOGGER.use_python_logging_system, G_LOGGER.colors)
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE
    py_logger = logging.getLogger("Polygraphy")
    saved_py = (py_logger.level, py_logger.propagate)
    sink = _Sink(level=1)
    py_logger.addHandler(sink)
    py_logger.setLevel(1)
    py_logger.propagate = False  # the verbose flood stays in the capture, not on the root logger
    try:
        yield lines
    finally:
        py_logger.removeHandler(sink)
        py_logger.setLevel(saved_py[0])
        py_logger.propagate = saved_py[1]
        G_LOGGER.module_severity, G_LOGGER.use_python_logging_system, G_LOGGER.colors = saved


def _onnx_io(path: Path) -> tuple[str, tuple[int, ...], bool]:
    """(input name, (C, H, W), dynamic batch) of an exported ONNX."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    batch = dims[0]
    dynamic = not batch.HasField("dim_value") or batch.dim_value <= 0
    return inp.name, tuple(int(d.dim_value) for d in dims[1:]), dynamic


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _calibration_batches(source: str, onnx_dir: Path, input_name: str, batch: int) -> tuple[list[dict], dict[str, Any]]:
    from mpdeploy.core import artifacts
    from mpdeploy.models.data import input_batches, load_images

    model = artifacts.read_manifest(onnx_dir, "onnx", verify=False)["model"]
    data = load_images(source, tuple(model["input_shape"]), split="calib", data_config=model.get("data_config"),
                       limit=batch * CALIB_BATCHES)
    batches = [{input_name: x.numpy().astype(np.float32)} for x in input_batches(data, batch, CALIB_BATCHES)]
    if not batches:
        raise MpdeployError(f"calibration source {source!r} holds no images; pass --calib DIR|digits")
    info = {"source": source, "description": data.description, "batches": len(batches), "batch": batch}
    if data.synthetic:
        info["warning"] = "synthetic calibration data: INT8 scales are meaningless, for smoke runs only"
        logger.warning(info["warning"])
    return batches, info


class TrtEngineRunner(Runner):
    """Polygraphy's TrtRunner for `run`; a second execution context timed with CUDA events for `time`."""

    def __init__(self, engine):
        from polygraphy.backend.trt import TrtRunner

        self.engine = engine
        self.runner = TrtRunner(engine)
        self.runner.activate()
        self.input_name = next(n for n in self._tensor_names() if self._is_input(n))
        self.output_name = next(n for n in self._tensor_names() if not self._is_input(n))
        self._timing_context = None

    def _tensor_names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _is_input(self, name: str) -> bool:
        trt = _trt()
        return self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.runner.infer({self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[self.output_name], dtype=np.float32)

    def time(self, x: np.ndarray, iterations: int) -> list[float]:
        import torch

        if self._timing_context is None:
            self._timing_context = self.engine.create_execution_context()
        ctx = self._timing_context
        xd = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()  # on the device once
        ctx.set_input_shape(self.input_name, tuple(xd.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        ctx.set_tensor_address(self.input_name, xd.data_ptr())
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
            end.record(stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times

    def close(self) -> None:
        if self.runner is not None and self.runner.is_active:
            self.runner.deactivate()
        self.runner = None
        self._timing_context = None


class TrtBackend(Backend):
    default_precision = "fp16"
    # typing: "strong" = strongly typed network from the precision's ONNX (TensorRT 10 and 11);
    # "legacy" = FP32 ONNX plus builder precision flags / calibrator (only where TensorRT still has them).
    options = {"typing": ("strong", "legacy"), "calibrator": ("entropy2", "minmax")}
    build_note = (f"TensorRT finds 2:4 from the zeros in dense weights: the sparse engine is built from "
                  f"{OnnxFolder.MODELS['sparse']} with SPARSE_WEIGHTS on, the dense twin from "
                  f"{OnnxFolder.MODELS['dense']} with it off")

    @classmethod
    def prune_plan(cls, model, input_shape, names: list[str], precision: str | None,
                   options: dict[str, Any]) -> SparsePlan:
        """TensorRT's placement rules on a legacy ONNX export of the dense model."""
        return tensorrt_rules_plan(cls.name, model, input_shape, names)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import tensorrt as trt
        except Exception as exc:  # noqa: BLE001 - must not raise
            return False, (f"TensorRT is not installed ({type(exc).__name__}: {exc}); use the Docker image or "
                           "pip install tensorrt on a GPU host")
        unsupported = unsupported_reason(detect_capabilities(trt))
        if unsupported:
            return False, unsupported
        try:
            import torch

            if not torch.cuda.is_available():
                return False, f"TensorRT {trt.__version__} imports but no CUDA device is visible"
            gpu = torch.cuda.get_device_name(0)
        except Exception as exc:  # noqa: BLE001
            return False, f"CUDA query failed ({type(exc).__name__}: {exc})"
        return True, f"TensorRT {trt.__version__} on {gpu}"

    def _timing_cache(self, config: BuildConfig) -> Path:
        if config.timing_cache is not None:
            return Path(config.timing_cache)
        info = self.device_info()
        return CACHE_DIR / f"timing-trt{info['tensorrt_version']}-{_slug(info['gpu'] or 'gpu')}.cache"

    def build(self, inputs: BuildInputs, variant: str, out_dir: Path, config: BuildConfig) -> BuiltEngine:
        trt = _trt()
        from polygraphy import util as pg_util
        from polygraphy.backend.trt import (
            Calibrator,
            CreateConfig,
            EngineBytesFromNetwork,
            NetworkFromOnnxPath,
            Profile,
            engine_from_bytes,
        )

        options = self.resolve_options(config)
        precision = self.resolve_precision(config)
        caps = detect_capabilities(trt)
        plan = plan_trt_build(variant, precision, options["typing"], caps)
        onnx_dir = Path(inputs.onnx_dir)
        onnx_path = require_precision_file(onnx_dir, variant, plan.onnx_precision)
        input_name, chw, dynamic = _onnx_io(onnx_path)
        bmin, bopt, bmax = config.profile_batches if dynamic else (1, 1, 1)
        profile = Profile().add(input_name, min=(bmin, *chw), opt=(bopt, *chw), max=(bmax, *chw))
        timing_cache = self._timing_cache(config)
        timing_cache.parent.mkdir(parents=True, exist_ok=True)

        kwargs: dict[str, Any] = {
            **plan.config,
            "profiles": [profile],
            "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,  # the inspector then reports tactics
            "load_timing_cache": str(timing_cache) if timing_cache.exists() else None,
        }
        if config.workspace_mib:
            kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(config.workspace_mib) << 20}
        calibration: dict[str, Any] | None = None
        if plan.calibrator:
            if not config.calib:
                raise MpdeployError("legacy-flag INT8 needs calibration data; pass --calib DIR|digits (synthetic only "
                                    "for smoke runs), or use the default strongly typed Q/DQ build")
            cache = Path(config.calib_cache) if config.calib_cache else CACHE_DIR / f"{sha256_file(onnx_path)[:16]}.cache"
            cache.parent.mkdir(parents=True, exist_ok=True)
            batches, calibration = _calibration_batches(config.calib, onnx_dir, input_name, bopt)
            base = trt.IInt8EntropyCalibrator2 if options["calibrator"] == "entropy2" else trt.IInt8MinMaxCalibrator
            kwargs["calibrator"] = Calibrator(batches, cache=str(cache), BaseClass=base)
            calibration.update(cache=str(cache), cache_existed=cache.exists(), calibrator=base.__name__,
                               note="implicit (calibrator) INT8 is deprecated in TensorRT 10 and removed in 11")

        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        engine_file = f"{variant}.plan"
        with capture_build_log() as lines:
            network = NetworkFromOnnxPath(str(onnx_path), **plan.network)
            engine_bytes = EngineBytesFromNetwork(network, CreateConfig(**kwargs), save_timing_cache=str(timing_cache))()
            seconds = time.perf_counter() - t0
            pg_util.save_file(contents=engine_bytes, dest=str(out_dir / engine_file), description="engine")
            engine = engine_from_bytes(engine_bytes)
            info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        log_text = "\n".join(lines) + "\n"
        (out_dir / f"{variant}.build.log").write_text(log_text)
        (out_dir / f"{variant}.layers.json").write_text(info if isinstance(info, str) else json.dumps(info))
        report = self._report(variant, precision, plan, caps, onnx_path, log_text, info, kwargs, config)
        report.update(profile={"input": input_name, "min": [bmin, *chw], "opt": [bopt, *chw], "max": [bmax, *chw]},
                      timing_cache=str(timing_cache), calibration=calibration, build_seconds_trt=seconds)
        del engine
        return BuiltEngine(file=engine_file, report=report)

    def _report(self, variant, precision, plan, caps, onnx_path, log_text, info, kwargs, config) -> dict[str, Any]:
        import onnx

        from mpdeploy.backends.trt.report import parse_engine_io
        from mpdeploy.onnx.qdq import qdq_graph_findings

        onnx_dir = onnx_path.parent
        layers = parse_engine_inspector(info)
        sparsity = parse_sparsity_log(log_text)
        record = onnx_dir / OnnxFolder.SPARSITY
        sparsity_json = json.loads(record.read_text()) if record.exists() else {}
        findings = qdq_graph_findings(onnx.load(str(onnx_path), load_external_data=False))
        report: dict[str, Any] = {
            "onnx": onnx_path.name,
            "sparse_weights": plan.config["sparse_weights"],
            "precision": precision,
            "typing": plan.typing,
            "network_flags": dict(plan.network),
            "flags": {k: v for k, v in kwargs.items() if k in ("fp16", "bf16", "int8", "sparse_weights")},
            "tensorrt": {"version": caps.version, "strongly_typed": caps.strongly_typed,
                         "precision_flags": sorted(caps.precision_flags), "int8_calibrator": caps.int8_calibrator},
            "plan_notes": list(plan.notes),
            "batch_sizes": list(config.batch_sizes),
            "eligible": sparsity["eligible"],
            "picked_sparse": sparsity["picked_sparse"],
            "layers": layers,
            "io": parse_engine_io(info),
            "graph_findings": {k: v for k, v in findings.items() if k != "warnings"},
            "log_file": f"{variant}.build.log",
            "inspector_file": f"{variant}.layers.json",
        }
        if variant == "sparse":
            report["layers_with_sparse_weights"] = [x["name"] for x in layers if x["has_sparse_weights"]]
            report["layers_with_sparse_tactic"] = [x["name"] for x in layers if x["sparse_tactic"]]
            report["not_sparse"] = layer_not_sparse_reasons(report)
            report["warnings"] = pitfall_warnings(report, sparsity_json) + findings["warnings"]
        return report

    def load(self, engine_path: Path, config: BuildConfig) -> Runner:
        _trt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise MpdeployError(f"TensorRT plan {engine_path} not found; run mpdeploy build")
        ok, why = self.availability()
        if not ok:
            raise MpdeployError(f"backend trt is not usable here: {why}")
        engine = None
        try:
            with capture_build_log():
                engine = EngineFromBytes(BytesFromPath(str(engine_path)))()
        except Exception as exc:  # noqa: BLE001 - Polygraphy raises PolygraphyException via G_LOGGER.critical
            logger.debug("deserializing %s failed: %s", engine_path, exc)
        if engine is None:
            raise MpdeployError(f"{engine_path} does not deserialize here (a plan runs only on the GPU model and "
                                "TensorRT version that built it); rebuild it on this machine")
        return TrtEngineRunner(engine)

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": "cuda:0", "gpu": None, "tensorrt_version": None}
        try:
            import tensorrt as trt

            info["tensorrt_version"] = trt.__version__
        except ImportError:
            pass
        try:
            from importlib.metadata import version

            info["polygraphy_version"] = version("polygraphy")
        except Exception:  # noqa: BLE001
            info["polygraphy_version"] = None
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                info.update(gpu=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                            cuda_version=torch.version.cuda)
        except Exception:  # noqa: BLE001
            pass
        from mpdeploy.core.machine import driver_version

        info["driver"] = driver_version()
        # A plan runs only on the GPU model and TensorRT version that built it.
        info["fingerprint"] = {"gpu": info["gpu"], "tensorrt_version": info["tensorrt_version"]}
        return info

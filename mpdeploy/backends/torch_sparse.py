"""PyTorch backend: the pruned model on CUDA with 2:4 weights as `torch.sparse` semi-structured tensors.

Each nn.Linear whose weight is 2:4 along `in` (and fits the kernel's shape rules) gets its weight replaced
by `torch.sparse.to_sparse_semi_structured(weight)`, which dispatches linear/mm/addmm to cuSPARSELt
(default) or CUTLASS (`SparseSemiStructuredTensor._FORCE_CUTLASS`) sparse tensor-core kernels. 1x1
convolutions (stride 1, groups 1) are the same matrix product over channels: with option conv1x1=large
(default) those with >= 256 input and output channels run as a Linear over a channels-last view (the
model is put in channels_last so the view is free); smaller ones stay dense because sparse kernels rarely
win there. k x k convolutions stay dense (the sparse tensor path has no conv). The dense twin is the
same model, unconverted, in the same dtype.

Everything that needs no GPU (which layers convert, the shape rules) runs and is tested on CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy.backends.base import Backend, BuildConfig, BuildInputs, BuiltEngine, Runner, SparsePlan
from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import PrunedFolder, open_weights
from mpdeploy.core.machine import driver_version

logger = logging.getLogger(__name__)

KERNELS = ("cusparselt", "cutlass")
CONV_MIN_CHANNELS = 256  # sparse GEMMs beat dense only when both channel counts are large (tensorrt.md)
PRUNED_COPY = "pruned"  # the pruned artifact copied into the engine folder: what load re-creates the model from


def torch_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def kernel_class(kernel: str):
    import torch.sparse

    if kernel not in KERNELS:
        raise MpdeployError(f"unknown sparse kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    return (torch.sparse.SparseSemiStructuredTensorCUTLASS if kernel == "cutlass"
            else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)


def shape_constraints(kernel: str, precision: str) -> tuple[int, int] | None:
    """(rows, cols) a weight must be a positive multiple of for this kernel and dtype; None if unsupported.

    Read from torch's own table (`_DTYPE_SHAPE_CONSTRAINTS`), which differs between kernels and versions.
    """
    table = kernel_class(kernel)._DTYPE_SHAPE_CONSTRAINTS
    cfg = table.get(torch_dtype(precision))
    return (cfg.sparse_min_rows, cfg.sparse_min_cols) if cfg is not None else None


def is_24_rows(weight2d) -> bool:
    """At most two nonzeros in every 4 consecutive entries of each row (PyTorch [out, in] along `in`)."""
    w = weight2d.detach()
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def weight_problem(weight2d, kernel: str, precision: str, check_pattern: bool = True) -> str | None:
    """Why this 2-D weight cannot become a semi-structured sparse tensor, or None if it can.

    `check_pattern=False` asks whether it could once pruned to 2:4 (the plan `prune --backend torch` follows)."""
    if weight2d.dim() != 2:
        return f"{weight2d.dim()}-D weight: semi-structured sparsity takes 2-D weights only"
    limits = shape_constraints(kernel, precision)
    if limits is None:
        return f"{kernel} has no {precision} semi-structured kernel"
    rows, cols = weight2d.shape
    min_rows, min_cols = limits
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return f"shape [{rows}, {cols}] is not a positive multiple of ({min_rows}, {min_cols}) for {kernel} {precision}"
    if check_pattern and not is_24_rows(weight2d):
        return "weight is not 2:4 along its input dimension (pattern is not 2:4-compliant, or the layer was not pruned)"
    return None


def _is_conv1x1(module) -> bool:
    from torch import nn

    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), 0, "valid"))


def plan_conversion(model, kernel: str = "cusparselt", precision: str = "fp16", conv1x1: str = "large",
                    check_pattern: bool = True) -> list[dict[str, Any]]:
    """Which Linear / Conv2d layers become sparse, and why the others do not. Needs no GPU.

    `check_pattern=False`: which would, once pruned to 2:4 (the dense model's plan, for pruning)."""
    from torch import nn

    plan = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            problem = weight_problem(weight, kernel, precision, check_pattern)
            plan.append({"name": name, "kind": "linear", "shape": list(weight.shape), "convert": problem is None,
                         "reason": problem})
        elif isinstance(module, nn.Conv2d):
            shape = list(module.weight.shape)
            entry = {"name": name, "kind": "conv", "shape": shape, "convert": False}
            if not _is_conv1x1(module):
                entry["reason"] = ("k x k / strided / grouped conv: the semi-structured path dispatches linear/mm/addmm "
                                   "only, so it stays dense")
            elif conv1x1 == "off":
                entry["reason"] = "1x1 conv: conversion off (option conv1x1=off)"
            elif conv1x1 == "large" and min(shape[0], shape[1]) < CONV_MIN_CHANNELS:
                entry["reason"] = (f"1x1 conv with {shape[1]} -> {shape[0]} channels: below {CONV_MIN_CHANNELS}, where "
                                   "sparse kernels rarely beat dense (option conv1x1=all converts it anyway)")
            else:
                problem = weight_problem(module.weight.reshape(shape[0], shape[1]), kernel, precision, check_pattern)
                entry.update(kind="conv1x1", convert=problem is None, reason=problem)
            plan.append(entry)
    return plan


def conv1x1_as_linear_class():
    import torch
    from torch import nn

    class Conv1x1AsLinear(nn.Module):
        """A 1x1 conv (stride 1, groups 1) as a Linear over channels; NCHW in, NCHW (channels-last strides) out."""

        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            out_ch, in_ch = conv.weight.shape[:2]
            self.weight = nn.Parameter(conv.weight.detach().reshape(out_ch, in_ch).contiguous(), requires_grad=False)
            self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            # Free for a channels_last input; otherwise one copy (the price of the dense->sparse hand-off).
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
            y = nn.functional.linear(rows, self.weight, self.bias)
            return y.view(n, h, w, -1).permute(0, 3, 1, 2)

    return Conv1x1AsLinear


def convert_model(model, plan: list[dict[str, Any]], kernel: str):
    """Swap the planned weights for semi-structured sparse tensors (model already on CUDA, in its dtype)."""
    import torch
    from torch import nn
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    wrapper = conv1x1_as_linear_class()
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = kernel == "cutlass"  # read at conversion time only
    try:
        with torch.no_grad():
            for entry in plan:
                if not entry["convert"]:
                    continue
                module = model.get_submodule(entry["name"])
                if entry["kind"] == "conv1x1":
                    parent_name, _, child = entry["name"].rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    module = wrapper(module)
                    setattr(parent, child, module)
                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                             requires_grad=False)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return model


class TorchRunner(Runner):
    def __init__(self, model, device: str, dtype, channels_last: bool):
        self.model, self.device, self.dtype, self.channels_last = model, device, dtype, channels_last

    def _to_device(self, x: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(self._to_device(x)).float().cpu().numpy()

    def time(self, x: np.ndarray, iterations: int) -> list[float]:
        import torch

        xd = self._to_device(x)  # on the device once: this times the model, not the copies
        stream = torch.cuda.current_stream()
        times = []
        with torch.inference_mode():
            for _ in range(iterations):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                self.model(xd)
                end.record(stream)
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
        return times

    def close(self) -> None:
        self.model = None


class TorchSparseBackend(Backend):
    default_precision = "fp16"
    options = {"kernel": KERNELS, "conv1x1": ("large", "all", "off")}

    @classmethod
    def weights_plan(cls, model, precision: str | None, options: dict[str, Any],
                     check_pattern: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        defaults = {k: v[0] for k, v in cls.options.items()}
        settings = {"precision": precision or cls.default_precision,
                    "kernel": options.get("kernel") or defaults["kernel"],
                    "conv1x1": options.get("conv1x1") or defaults["conv1x1"]}
        return settings, plan_conversion(model, settings["kernel"], settings["precision"], settings["conv1x1"],
                                         check_pattern=check_pattern)

    @classmethod
    def prune_plan(cls, model, input_shape, names: list[str], precision: str | None,
                   options: dict[str, Any]) -> SparsePlan:
        """Its conversion plan for the kernel / precision / conv1x1 option, without the 2:4 check (the dense
        model is not pruned yet): shape rules, Linear and large 1x1 convs."""
        settings, plan = cls.weights_plan(model, precision, options, check_pattern=False)
        wanted = set(names)
        runs_dense = {e["name"]: f"{cls.name} runs it dense: {e['reason']}" for e in plan
                      if e["name"] in wanted and not e["convert"]}
        return SparsePlan(cls.name, f"{cls.name} conversion plan (kernel, precision, shape rules; Linear and 1x1 convs)",
                          settings, runs_dense)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import torch

            if not torch.cuda.is_available():
                return False, "no CUDA device (torch.cuda.is_available() is False)"
            major, minor = torch.cuda.get_device_capability(0)
            name = torch.cuda.get_device_name(0)
        except Exception as exc:  # noqa: BLE001 - must not raise
            return False, f"CUDA query failed ({type(exc).__name__}: {exc})"
        if (major, minor) < (8, 0):
            return False, f"{name} has compute capability {major}.{minor}; 2:4 sparse tensor cores need >= 8.0 (Ampere)"
        return True, f"{name} (sm_{major}{minor}), torch {torch.__version__}"

    def _precision(self, config: BuildConfig, kernel: str) -> str:
        precision = self.resolve_precision(config)
        if precision == "int8":
            raise MpdeployError("the torch backend does not build int8 engines (needs quantized activations); use "
                                "--precision fp16/bf16, or --backend trt for int8")
        if precision == "fp32" and kernel != "cutlass":
            raise MpdeployError("cuSPARSELt has no fp32 semi-structured kernel; use --precision fp16/bf16, or the "
                                "CUTLASS kernel (--torch-kernel cutlass) for fp32")
        return precision

    def _device(self, config: BuildConfig) -> str:
        return config.device or "cuda:0"

    def build(self, inputs: BuildInputs, variant: str, out_dir: Path, config: BuildConfig) -> BuiltEngine:
        import torch

        from mpdeploy.sparsity.pruned import load_pruned

        if inputs.pruned_dir is None:
            raise MpdeployError("the torch backend builds from the pruned artifact; pass its folder (pruned/)")
        ok, why = self.availability()
        if not ok:
            raise MpdeployError(f"backend torch is not usable here: {why}; use --backend ort")
        options = self.resolve_options(config)
        kernel, precision = options["kernel"], self._precision(config, options["kernel"])
        out_dir = Path(out_dir)
        copy = out_dir / PRUNED_COPY
        if not (copy / artifacts.MANIFEST).exists():
            # Every file the pruned manifest lists, so load_pruned can verify the copy on its own.
            source = Path(inputs.pruned_dir)
            listed = open_weights(source).manifest.get("files") or {}
            for rel in [artifacts.MANIFEST, *listed]:
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / rel, copy / rel)

        t0 = time.perf_counter()
        art = load_pruned(copy, "sparse" if variant == "sparse" else "dense", verify=True, chain=False)
        plan = plan_conversion(art.model, kernel, precision, options["conv1x1"]) if variant == "sparse" else []
        device, dtype = self._device(config), torch_dtype(precision)
        reference = art.model.to(device, dtype).eval()
        channels_last = any(e["convert"] and e["kind"] == "conv1x1" for e in plan)
        shape = (config.profile_batches[1], *art.input_shape)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.inference_mode():
            expected = reference(x).float()
        model = reference
        if plan:
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            model = convert_model(model, plan, kernel)
        with torch.inference_mode():
            got = model(x).float()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        diff = float((got - expected).abs().max())
        spec = {
            "schema": "mpdeploy.torch_engine/1",
            "variant": variant,
            "pruned_dir": PRUNED_COPY,
            "weights": PrunedFolder.WEIGHTS[variant],
            "precision": precision,
            "kernel": kernel,
            "conv1x1": options["conv1x1"],
            "channels_last": channels_last,
            "plan": plan,
        }
        file = f"{variant}.torch.json"
        (out_dir / file).write_text(json.dumps(spec, indent=2) + "\n")
        converted = [e["name"] for e in plan if e["convert"]]
        report = {
            "precision": precision,
            "kernel": kernel if plan else None,
            "converted_layers": converted,
            "not_converted": [{"layer": e["name"], "reason": e["reason"]} for e in plan if not e["convert"]],
            "channels_last": channels_last,
            "max_abs_diff_vs_unconverted": diff,
            "check_batch": shape[0],
            "load_convert_seconds": seconds,
        }
        del model, reference
        torch.cuda.empty_cache()
        return BuiltEngine(file=file, report=report)

    def load(self, engine_path: Path, config: BuildConfig) -> Runner:
        import torch

        from mpdeploy.sparsity.pruned import load_pruned

        engine_path = Path(engine_path)
        try:
            spec = json.loads(engine_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MpdeployError(f"cannot read torch engine {engine_path} ({exc}); rebuild with mpdeploy build") from None
        ok, why = self.availability()
        if not ok:
            raise MpdeployError(f"backend torch is not usable here: {why}; the engine needs a CUDA GPU (sm_80+)")
        art = load_pruned(engine_path.parent / spec["pruned_dir"], spec["variant"], verify=True, chain=False)
        device, dtype = self._device(config), torch_dtype(spec["precision"])
        model = art.model.to(device, dtype).eval()
        plan = spec["plan"]
        if plan:
            if spec["channels_last"]:
                model = model.to(memory_format=torch.channels_last)
            model = convert_model(model, plan, spec["kernel"])
        return TorchRunner(model, device, dtype, spec["channels_last"])

    def device_info(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {"name": "cpu", "gpu": None, "tensorrt_version": None, "torch_version": torch.__version__,
                                "cuda_version": torch.version.cuda}
        try:
            info["cusparselt_version"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        except Exception:  # noqa: BLE001 - older torch
            info["cusparselt_version"] = None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(name="cuda:0", gpu=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), driver=driver_version())
        info["fingerprint"] = {k: info.get(k) for k in ("gpu", "torch_version", "cuda_version", "cusparselt_version")}
        return info

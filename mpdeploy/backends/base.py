"""The one interface every backend implements: build an engine, load it, run a batch, time it.

Backends live in `mpdeploy/backends/` (named in `mpdeploy.core.names.BACKENDS`) and are imported lazily
through `create_backend`, so
TensorRT or CUDA are touched only when asked for.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.names import BACKENDS, PRECISIONS


@dataclass(frozen=True)
class BuildConfig:
    precision: str | None = None  # None -> the backend's default (fp16 on GPU backends, fp32 on ort CPU)
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # optimization profile: min / opt / max taken from these
    calib: str | None = None  # int8 calibration data (DIR | digits | synthetic)
    calib_cache: Path | None = None  # default: calib/cache/<onnx sha>.cache
    timing_cache: Path | None = None
    workspace_mib: int | None = None
    device: str | None = None  # e.g. "cuda:0"; None -> the backend's default
    # Backend-specific knobs as sorted (key, value) pairs so the config stays hashable, e.g.
    # (("kernel", "cutlass"),) for torch or (("optimization", "none"),) for ort. Unknown keys fail.
    backend_options: tuple[tuple[str, Any], ...] = ()
    threads: int | None = None  # run time only (ORT intra_op_num_threads); not part of the build hash

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise MpdeployError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise MpdeployError("batch sizes must be positive integers, e.g. --batch-sizes 1,8,32")
        if self.threads is not None and self.threads < 1:
            raise MpdeployError(f"--threads must be at least 1, not {self.threads}")
        object.__setattr__(self, "batch_sizes", tuple(sorted({int(b) for b in self.batch_sizes})))
        object.__setattr__(self, "backend_options", tuple(sorted((str(k), v) for k, v in dict(self.backend_options).items())))

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.backend_options).get(key, default)

    @property
    def profile_batches(self) -> tuple[int, int, int]:
        """(min, opt, max) batch for an optimization profile: opt is the middle of the sorted sizes."""
        sizes = self.batch_sizes
        return sizes[0], sizes[len(sizes) // 2], sizes[-1]

    def build_fields(self) -> dict[str, Any]:
        """The fields that shape a built engine (what the build stage hashes for reuse)."""
        from dataclasses import asdict

        fields = asdict(self)
        fields.pop("threads")
        return fields


@dataclass(frozen=True)
class BuildInputs:
    """What a build may read: the `onnx/` artifact (every backend) and the `pruned/` one (torch)."""

    onnx_dir: Path
    pruned_dir: Path | None = None


@dataclass(frozen=True)
class SparsePlan:
    """What a backend will run sparse: `runs_dense` maps each candidate layer it will not to why."""

    backend: str  # the backend asked for
    rules: str  # whose rules decided
    settings: dict[str, Any]
    runs_dense: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    def record(self) -> dict[str, Any]:
        """The prune manifest's `pruned_for` entry."""
        return {"backend": self.backend, "rules": self.rules, "settings": self.settings,
                "runs_dense": dict(self.runs_dense), "note": self.note}


@dataclass
class BuiltEngine:
    file: str  # file name inside the engine folder
    report: dict[str, Any] = field(default_factory=dict)  # what the builder saw and chose (per variant)


class Runner(abc.ABC):
    """A loaded engine. Inputs and outputs are float32 numpy arrays on the host."""

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def time(self, x: np.ndarray, iterations: int) -> list[float]:
        """Milliseconds per call for `iterations` back-to-back calls, device-synchronized each call.

        The input is placed on the device once: this times the engine, not host transfers.
        """

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    name: ClassVar[str]  # its key in core.names.BACKENDS (set from there: the name is spelled only in the table)
    default_precision: ClassVar[str]
    # backend option -> allowed values, the first one the default (BuildConfig.backend_options)
    options: ClassVar[dict[str, tuple[Any, ...]]] = {}
    build_note: ClassVar[str | None] = None  # how it builds the two variants, for the build report's notes

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            implementation = f"{cls.__module__}:{cls.__qualname__}"
            cls.name = next((n for n, t in BACKENDS.items() if t.implementation == implementation), cls.__qualname__)

    def resolve_options(self, config: BuildConfig) -> dict[str, Any]:
        """This backend's options with defaults filled in; an unknown key or value is a user error."""
        given = dict(config.backend_options)
        resolved = {}
        for key, allowed in self.options.items():
            value = given.pop(key, allowed[0])
            if value not in allowed:
                raise MpdeployError(f"backend {self.name}: option {key}={value!r} is not one of {', '.join(map(str, allowed))}")
            resolved[key] = value
        if given:
            known = ", ".join(self.options) or "none"
            raise MpdeployError(f"backend {self.name} has no option {', '.join(given)} (its options: {known})")
        return resolved

    def resolve_precision(self, config: BuildConfig) -> str:
        return config.precision or self.default_precision

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why / why not). Must not raise."""

    @abc.abstractmethod
    def build(self, inputs: BuildInputs, variant: str, out_dir: Path, config: BuildConfig) -> BuiltEngine:
        """Build the `variant` ("sparse" | "dense") engine into `out_dir` (a temporary folder)."""

    @abc.abstractmethod
    def load(self, engine_path: Path, config: BuildConfig) -> Runner: ...

    def device_info(self) -> dict[str, Any]:
        """What the engine runs on (CPU model / GPU name, driver, library versions)."""
        return {}

    @classmethod
    def prune_plan(cls, model, input_shape, names: list[str], precision: str | None,
                   options: dict[str, Any]) -> SparsePlan:
        """Which of the candidate layers `names` of the dense `model` this backend will run dense, decided
        before pruning (`prune --backend`), so those stay dense. Needs no GPU."""
        raise MpdeployError(f"backend {cls.name} has no plan of which layers it runs sparse; prune without --backend")

    @classmethod
    def weights_plan(cls, model, precision: str | None, options: dict[str, Any],
                     check_pattern: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(settings, one entry {"name", "convert", "reason"} per layer): which layers of `model` run sparse,
        where that follows from the weights alone (core.names trait plan_from_weights); no build, no GPU.
        `check_pattern=False`: which would, once pruned to 2:4 (the dense model's plan)."""
        raise MpdeployError(f"backend {cls.name} decides sparse use only when it builds; pass its engine folder")


def engine_load_config(manifest: dict[str, Any], batch_sizes, threads: int | None = None) -> BuildConfig:
    """The BuildConfig to load an engine with, from its manifest (the precision and the run-time options
    the engine stage recorded); `threads` overrides."""
    runtime = manifest.get("runtime") or {}
    recorded = runtime.get("backend_options") or ((manifest.get("config") or {}).get("build") or {}).get(
        "backend_options") or []
    # A hand-edited manifest (re-hashed) can hold anything here: one line, not a traceback.
    if not isinstance(recorded, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in recorded) \
            or not isinstance(runtime.get("threads") or 0, int):
        raise MpdeployError("the engine manifest's runtime options are damaged (edited by hand?); rebuild the engine")
    options = tuple(tuple(kv) for kv in recorded)
    precision = manifest.get("precision")
    return BuildConfig(precision=precision if precision in PRECISIONS else None, batch_sizes=tuple(batch_sizes),
                       backend_options=options, threads=threads or runtime.get("threads"))


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise MpdeployError(f"unknown backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[name].implementation.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def resolve_backend(name: str = "auto") -> tuple[str, str]:
    """Pick a backend: `auto` takes the first usable one of trt > torch > ort. Returns (name, why)."""
    if name != "auto":
        ok, why = backend_class(name).availability()
        if not ok:
            raise MpdeployError(f"backend {name!r} is not usable here: {why}; use --backend auto or ort")
        return name, f"asked for ({why})"
    reasons = []
    for candidate in BACKENDS:
        ok, why = backend_class(candidate).availability()
        if ok:
            skipped = f"; skipped {', '.join(reasons)}" if reasons else ""
            return candidate, f"auto: {candidate} ({why}){skipped}"
        reasons.append(f"{candidate}: {why}")
    raise MpdeployError("no backend is usable: " + "; ".join(reasons))


def create_backend(name: str) -> Backend:
    return backend_class(name)()

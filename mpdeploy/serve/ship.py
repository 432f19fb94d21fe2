"""Ship an audited engine into a Triton Inference Server model repository.

    <repo>/<name>/config.pbtxt              one config per model, shared by its versions
    <repo>/<name>/<version>/model.plan      tensorrt_plan     (engine-trt)
    <repo>/<name>/<version>/model.onnx      onnxruntime_onnx  (engine-ort)
    <repo>/<name>/<version>/model.py        python backend: ONNX Runtime inside Triton (engine-ort,
                           + model.onnx     --serve-backend python)
    <repo>/<name>/<version>/provenance.json audit summary, engine manifest, hashes, target GPU/TensorRT
    <repo>/<name>/<version>/SHA256SUMS      `cd <version> && sha256sum -c SHA256SUMS`

The config is built through Triton's own model-config protobuf, so what we write is what Triton parses.
Nothing in the repository changes unless the whole ship succeeds: files are written under temp names
next to their targets and renamed into place. What is read from the engine directory (which engine,
its manifest and file, its audit) is verified in `ship_inputs.py` first.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.artifacts import sha256_file
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.names import BACKENDS, VARIANTS, backends_with, engine_folder_name, traits
from mpdeploy.serve.inputs import (
    audit_of_engine,
    check_verdict,
    engine_file,
    open_engine,
    pick_engine_backend,
    read_audit,
)
from mpdeploy.serve.triton_config import build_model_config, config_to_text, parse_config
from mpdeploy.serve.triton_repo import (
    CONFIG_FILE,
    MODEL_FILES,
    PROVENANCE_FILE,
    SUMS_FILE,
    VersionTaken,
    remove_stale_tmp,
    rename_new,
    short_path,
    tmp_name_next_to,
    write_error,
    write_text,
)

logger = logging.getLogger(__name__)

AUDIT_SCHEMA = "mpdeploy.audit/1"
PROVENANCE_SCHEMA = "mpdeploy.ship/1"
SERVE_BACKENDS = ("auto", "python")
ONNX_PLATFORM = "onnxruntime_onnx"  # the platform whose file the python backend serves (with ONNX Runtime)
KINDS = ("KIND_GPU", "KIND_CPU")

# Copied verbatim as model.py for --serve-backend python; a module of this package, so wheels carry it.
_PYTHON_MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")
# Triton model names become URL path parts and folder names: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ShipConfig:
    """How to ship one engine; defaults serve the audited sparse engine on its native Triton platform."""

    repo: Path
    name: str | None = None  # default: the engine directory's name
    version: int | None = None  # default: next free, starting at 1
    max_batch_size: int = 8  # 0: no batching, dims carry the full shape
    variant: str = "sparse"  # "sparse" | "dense"
    serve_backend: str = "auto"  # "auto": tensorrt_plan / onnxruntime_onnx; "python": ORT in Python backend
    instance_count: int = 1
    kind: str | None = None  # "KIND_GPU" | "KIND_CPU"; default GPU for plans, CPU otherwise
    force: bool = False  # ship an unaudited / failed engine, replace a different config.pbtxt
    engine_backend: str | None = None  # which engine-<backend>/; default: the audited one, else the only one
    python_env: Path | None = None  # EXECUTION_ENV_PATH for the python backend; default sys.prefix


# ---------------------------------------------------------------------------------------------------
# writing


def _mpdeploy_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mpdeploy")
    except metadata.PackageNotFoundError:
        import mpdeploy

        return str(getattr(mpdeploy, "__version__", "unknown"))


def _validate(config: ShipConfig) -> None:
    if config.variant not in VARIANTS:
        raise MpdeployError(f"variant {config.variant!r} unknown; use sparse or dense")
    if config.serve_backend not in SERVE_BACKENDS:
        raise MpdeployError(f"serve backend {config.serve_backend!r} unknown; use auto or python")
    if config.max_batch_size < 0:
        raise MpdeployError(f"max batch size {config.max_batch_size} is negative; use 0 (no batching) or more")
    if config.instance_count < 1:
        raise MpdeployError(f"instance count {config.instance_count} must be at least 1")
    if config.kind is not None and config.kind not in KINDS:
        raise MpdeployError(f"instance kind {config.kind!r} unknown; use KIND_GPU or KIND_CPU")
    if config.version is not None and config.version < 1:
        raise MpdeployError(f"version {config.version} must be a positive integer (Triton versions start at 1)")


def _next_version(model_dir: Path) -> int:
    if not model_dir.is_dir():
        return 1
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(taken, default=0) + 1


def _fill_version_dir(
    dest: Path, model_files: list[str], source: Path, provenance: dict[str, Any], expected: str
) -> None:
    """Write model file(s), provenance.json and SHA256SUMS into `dest` (a new staging folder)."""
    dest.mkdir()
    for fname in model_files:
        shutil.copyfile(_PYTHON_MODEL_TEMPLATE if fname == MODEL_FILES["python"] else source, dest / fname)
    write_text(dest / PROVENANCE_FILE, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    sums = {p.name: sha256_file(p) for p in sorted(dest.iterdir())}
    if sums[model_files[-1]] != expected:
        raise MpdeployError(f"copy of {source} does not match its manifest sha256; check the disk and retry")
    write_text(dest / SUMS_FILE, "".join(f"{h}  {n}\n" for n, h in sums.items()))


def _resolve_serving(backend: str, config: ShipConfig) -> tuple[str, str, list[str]]:
    """(serve, kind, model files) for an engine backend: serve is a Triton platform or "python"."""
    platform = traits(backend).triton_platform  # what Triton serves this backend's engine file with
    if platform is None:
        raise MpdeployError(
            f"{backend} engines have no file Triton can serve; build with --backend "
            f"{' or '.join(sorted(backends_with('triton_platform')))} and ship that engine"
        )
    if config.serve_backend == "python":
        if platform != ONNX_PLATFORM:
            onnx_backends = [b for b, t in BACKENDS.items() if t.triton_platform == ONNX_PLATFORM]
            raise MpdeployError(
                f"--serve-backend python serves ONNX with ONNX Runtime, but {engine_folder_name(backend)} holds "
                f"{platform} engines; use --serve-backend auto ({platform}) or ship an {' or '.join(onnx_backends)} engine"
            )
        serve, files = "python", [MODEL_FILES["python"], MODEL_FILES[ONNX_PLATFORM]]
    else:
        serve, files = platform, [MODEL_FILES[platform]]
    kind = config.kind or ("KIND_GPU" if serve == "tensorrt_plan" else "KIND_CPU")
    if serve == "python" and kind == "KIND_GPU":
        # The template runs ONNX Runtime's CPU provider; a GPU instance would only pin the process.
        logger.warning("python-backend model runs ONNX Runtime on CPU; KIND_GPU only places the instance")
    return serve, kind, files


@dataclass
class _Plan:
    """Everything decided before the repository is touched."""

    engine_dir: Path
    repo: Path
    name: str
    backend: str
    serve: str
    model_files: list[str]
    source: Path
    expected_sha256: str  # of the engine file, as its manifest records it (the copy is checked against it)
    model_cfg: Any
    config_text: str
    provenance: dict[str, Any]  # without version and config_sha256, filled per attempt
    verified: dict[str, str | None]  # the manifest hashes checked: engine_manifest_sha256, audit_manifest_sha256

    @property
    def model_dir(self) -> Path:
        return self.repo / self.name


def _plan(engine_dir: Path, config: ShipConfig) -> _Plan:
    """Read and check everything shipping needs; refuses (exit 2) before the repository is touched."""
    _validate(config)
    engine_dir, repo, name = _check_places(Path(engine_dir), config)
    audit = read_audit(engine_dir)
    backend = pick_engine_backend(engine_dir, config.engine_backend, audit)
    serve, kind, model_files = _resolve_serving(backend, config)
    engine = open_engine(engine_dir, backend)  # integrity first: --force never skips it
    manifest = engine.manifest
    source = engine_file(engine_dir, backend, manifest, config.variant)
    problem = audit_of_engine(audit, engine, engine_dir)
    check_verdict(audit, problem, engine_dir, config.force)
    shipped_audit = audit if problem is None else None  # a forced ship past another engine's audit has none
    python_env = Path(config.python_env or sys.prefix).resolve() if serve == "python" else None
    if python_env is not None and not python_env.exists():
        raise MpdeployError(
            f"python environment {python_env} does not exist; pass --python-env with a venv, conda env or tarball"
        )
    model_cfg = build_model_config(
        name,
        manifest,
        serve=serve,
        max_batch_size=config.max_batch_size,
        kind=kind,
        instance_count=config.instance_count,
        python_env=python_env,
    )
    verified = {"engine_manifest_sha256": artifacts.manifest_hash(engine.path),
                "audit_manifest_sha256": None if shipped_audit is None else artifacts.manifest_hash(audit.path)}
    provenance = _provenance(name, engine_dir, backend, serve, source, manifest,
                             None if shipped_audit is None else shipped_audit.result(), config, verified)
    if serve == "tensorrt_plan":
        device = manifest.get("device") or {}
        gpu, trt_version = device.get("gpu"), device.get("tensorrt_version")
        logger.info("plan built for GPU %s, TensorRT %s: serve it on the same", gpu, trt_version)
    return _Plan(
        engine_dir=engine_dir,
        repo=repo,
        name=name,
        backend=backend,
        serve=serve,
        model_files=model_files,
        source=source,
        expected_sha256=manifest["files"][manifest["variants"][config.variant]],
        model_cfg=model_cfg,
        config_text=config_to_text(model_cfg),
        provenance=provenance,
        verified=verified,
    )


def _check_places(engine_dir: Path, config: ShipConfig) -> tuple[Path, Path, str]:
    """(engine dir, repository, model name) once the engine dir exists, the repository is no file and
    the name is one Triton takes."""
    try:
        engine_found = engine_dir.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise MpdeployError(f"engine directory {short_path(engine_dir)}: {exc.strerror}; pass engines/<name>") from exc
    if not engine_found:
        raise MpdeployError(
            f"engine directory {engine_dir} not found; pass the folder mpdeploy build wrote (engines/<name>)"
        )
    repo = Path(config.repo)
    try:
        repo_is_file = repo.exists() and not repo.is_dir()
    except OSError as exc:
        raise write_error(exc, repo) from exc
    if repo_is_file:
        raise MpdeployError(f"model repository {repo} is a file, not a directory; pass a folder for --repo")
    name = config.name or engine_dir.resolve().name
    if not _NAME_RE.match(name):
        raise MpdeployError(f"model name {name!r} is not usable by Triton; pass --name with letters, digits, _ . -")
    return engine_dir, repo, name


def _provenance(name: str, engine_dir: Path, backend: str, serve: str, source: Path, manifest: dict[str, Any],
                audit: dict[str, Any] | None, config: ShipConfig, verified: dict[str, str | None]) -> dict[str, Any]:
    """provenance.json of a version, without version and config_sha256 (filled per attempt)."""
    device = manifest.get("device") or {}
    return {
        "schema": PROVENANCE_SCHEMA,
        "model": name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mpdeploy_version": _mpdeploy_version(),
        "engine_dir": str(engine_dir.resolve()),
        "engine_backend": backend,
        "variant": config.variant,
        "engine_file": source.name,
        "serve": {"platform": serve} if serve != "python" else {"backend": "python"},
        "ship_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "forced": bool(config.force),
        "audit": None if audit is None else {k: audit.get(k) for k in ("backend", "passed", "failures", "summary")},
        "sources": manifest.get("sources"),
        # What ship verified: the engine folder whose manifest has this hash, audited by the audit whose
        # manifest has this hash (it records the engine's hash as its source). None: shipped unaudited (--force).
        "verified": dict(verified),
        # A plan only runs on the GPU model and TensorRT version that built it.
        "built_for": {
            "device": device.get("name"),
            "gpu": device.get("gpu"),
            "tensorrt_version": device.get("tensorrt_version"),
        },
        "engine_manifest": manifest,
    }


def _config_action(plan: _Plan, force: bool) -> bool:
    """Whether config.pbtxt must be (re)written; refuses a different existing config unless forced."""
    config_path = plan.model_dir / CONFIG_FILE
    if not config_path.exists():
        return True
    try:
        same = parse_config(config_path.read_text()) == plan.model_cfg
    except Exception as exc:  # noqa: BLE001 - any parse failure means "different"
        logger.debug("existing %s does not parse: %s", config_path, exc)
        same = False
    if same:
        return False
    if not force:
        raise MpdeployError(
            f"{config_path} exists with a different config (one config serves all versions of a model); "
            f"pass another --name, or --force to replace it"
        )
    logger.warning("replacing %s; it applies to every version in %s", config_path, plan.model_dir)
    return True


def _write_once(plan: _Plan, config: ShipConfig) -> Path:
    """One attempt: pick the version, stage everything under temp names, rename into place, undo on failure."""
    model_dir, config_path = plan.model_dir, plan.model_dir / CONFIG_FILE
    if model_dir.exists() and not model_dir.is_dir():
        raise MpdeployError(f"{model_dir} is a file, not a model folder; remove it or pass another --name")
    write_config = _config_action(plan, config.force)
    version = config.version or _next_version(model_dir)
    version_dir = model_dir / str(version)
    if version_dir.exists():
        raise MpdeployError(f"version {version_dir} already exists and is never overwritten; pass another --version")
    provenance = dict(plan.provenance, version=version)
    # The config actually served: the kept file when it is kept (same content, maybe other formatting).
    provenance["config_sha256"] = (
        hashlib.sha256(plan.config_text.encode()).hexdigest() if write_config else sha256_file(config_path)
    )

    created: list[Path] = []  # repository folders we had to create, removed again on failure
    tmp_paths: list[Path] = []
    placed: list[Path] = []
    try:
        for d in reversed([plan.repo, *plan.repo.parents]):
            if not d.exists():
                d.mkdir()
                created.append(d)
        if not model_dir.exists():
            # A new model appears whole (config + first version), never as a folder without config.
            stage = tmp_name_next_to(model_dir)
            tmp_paths.append(stage)
            stage.mkdir()
            write_text(stage / CONFIG_FILE, plan.config_text)
            _fill_version_dir(stage / str(version), plan.model_files, plan.source, provenance, plan.expected_sha256)
            rename_new(stage, model_dir)
            tmp_paths.remove(stage)
        else:
            stage = tmp_name_next_to(version_dir)
            tmp_paths.append(stage)
            _fill_version_dir(stage, plan.model_files, plan.source, provenance, plan.expected_sha256)
            tmp_config = tmp_name_next_to(config_path) if write_config else None
            if tmp_config is not None:
                tmp_paths.append(tmp_config)
                write_text(tmp_config, plan.config_text)
            rename_new(stage, version_dir)
            tmp_paths.remove(stage)
            placed.append(version_dir)
            if tmp_config is not None:
                os.replace(tmp_config, config_path)
                tmp_paths.remove(tmp_config)
    except BaseException:
        for p in tmp_paths + placed:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return version_dir


# Concurrent ships that pick the same next version: the loser re-reads the folder and takes the next one.
_MAX_VERSION_RACES = 32


@dataclass(frozen=True)
class Shipped:
    """Where a ship went, and the manifest hashes it verified (also in the version's provenance.json)."""

    version_dir: Path
    engine_manifest_sha256: str
    audit_manifest_sha256: str | None  # None: shipped without an audit of this engine (--force)

    def line(self) -> str:
        audit = self.audit_manifest_sha256 or "none (unaudited, --force)"
        return (f"{self.version_dir}: verified engine manifest sha256 {self.engine_manifest_sha256}, "
                f"audit manifest sha256 {audit}")


def ship(engine_dir: Path, config: ShipConfig) -> Path:
    """Copy an audited engine into a Triton model repository; returns `<repo>/<name>/<version>/`."""
    return ship_verified(engine_dir, config).version_dir


def ship_verified(engine_dir: Path, config: ShipConfig) -> Shipped:
    """`ship`, also returning the engine and audit manifest hashes it verified."""
    plan = _plan(engine_dir, config)
    try:
        with contextlib.suppress(FileNotFoundError):
            remove_stale_tmp(plan.repo)
            remove_stale_tmp(plan.model_dir)
        for _ in range(_MAX_VERSION_RACES):
            try:
                version_dir = _write_once(plan, config)
                break
            except VersionTaken as taken:
                if config.version is not None:
                    raise MpdeployError(
                        f"{taken} appeared while shipping (another ship into {plan.repo}?); pass another --version"
                    ) from None
                logger.info("%s was taken by a concurrent ship; trying the next version", taken)
        else:
            raise MpdeployError(
                f"{_MAX_VERSION_RACES} versions of {plan.model_dir} were taken by concurrent ships; run again"
            )
    except OSError as exc:
        raise write_error(exc, plan.repo) from exc
    logger.info("shipped %s (%s, %s) to %s", plan.source, plan.backend, plan.serve, version_dir)
    return Shipped(version_dir, plan.verified["engine_manifest_sha256"], plan.verified["audit_manifest_sha256"])

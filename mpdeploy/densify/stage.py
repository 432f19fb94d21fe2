"""The densify stage: an engine's report -> a new pruned artifact whose dense-running layers are dense again.

Input (opened only through mpdeploy.core.kinds, verified with its chain):

    engine-*/      its build report's per-layer sparse use (core.names trait sparse_use_report): TensorRT's
                   picked list (or --trt-log, a recorded TensorRT build log), or the converted list
    onnx/          with --trt-log: a TensorRT build of that ONNX done elsewhere (e.g. trtexec on a GPU host)
    pruned/        with --backend B whose sparse use follows from the weights (trait plan_from_weights):
                   its plan computed here (CPU is enough)

Output: `pruned` artifact files (model.safetensors with the returned layers' dense tensors taken
bit-for-bit from the chain's dense source, dense.safetensors as it was, masks.safetensors without
them), sources "weights" and the engine (or onnx) the evidence came from; the manifest's `densify`
record lists each returned layer and why, its `layers` / `totals` say dense for them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.densify.evidence import (
    Evidence,
    add_slow_layers,
    read_slow_layers,
    sparse_layer_names,
    torch_evidence,
    trt_evidence,
)
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import KINDS, EngineFolder, OnnxFolder, PrunedFolder
from mpdeploy.core.names import backends_with, traits

logger = logging.getLogger(__name__)

KIND = "pruned"
DEFAULT_DIR = "densified"  # <engine root>/densified/pruned (its onnx/, engine-*/, audit/ beside it)
_MANIFEST_BASE = ("schema", "kind", "created", "tool_versions", "config", "config_hash", "inputs", "files",
                  "sources", "self_sha256")


@dataclass(frozen=True)
class DensifyConfig:
    slow_layers: str | None = None  # file: layers whose sparse kernel timed slower than dense (GPU)
    trt_log: str | None = None  # file: a recorded TensorRT verbose build log (or inspector JSON) to read instead
    backend: str | None = None  # for a pruned/ input: the backend whose plan (from the weights) to compute here
    precision: str | None = None  # that plan's engine precision (default: the backend's)
    kernel: str | None = None  # that plan's backend options (the torch backend's kernel and conv1x1)
    conv1x1: str | None = None


@dataclass
class DensifyResult:
    path: Path | None  # None: nothing ran dense, no artifact written
    evidence: Evidence
    weights: Path

    @property
    def returned(self) -> dict[str, str]:
        return dict(self.evidence.ran_dense)


def open_input(path: Path):
    """The verified artifact at `path`: an engine, onnx, pruned or distilled folder."""
    path = Path(path)
    manifest = artifacts.read_json(path / artifacts.MANIFEST, what="artifact manifest") \
        if (path / artifacts.MANIFEST).is_file() else None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind not in ("engine", "onnx", "pruned", "distilled"):
        raise MpdeployError(f"{path} is not an engine, onnx or pruned artifact; pass engines/<name>/engine-<backend>")
    if kind in ("pruned", "distilled"):
        from mpdeploy.core.kinds import open_weights

        return open_weights(path)
    return KINDS[kind].open(path)


def _trt_report_from_file(path: Path) -> dict[str, Any]:
    """{"eligible", "picked_sparse", "layers"} from a recorded log (text) or engine-inspector JSON."""
    from mpdeploy.backends.trt.report import parse_engine_inspector, parse_sparsity_log

    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise MpdeployError(f"cannot read --trt-log {path} ({exc.strerror}); pass a readable file") from None
    if text.lstrip().startswith(("{", "[")):
        try:
            return {"eligible": None, "picked_sparse": None, "layers": parse_engine_inspector(text)}
        except ValueError:
            pass
    return {**parse_sparsity_log(text), "layers": []}


def engine_evidence(engine: EngineFolder, weights: PrunedFolder, trt_log: str | None = None) -> Evidence:
    """Which of `weights`' pruned layers `engine` ran sparse, from its own build report (or `trt_log`)."""
    pruned = sparse_layer_names(weights.layers)
    report_kind = traits(engine.backend).sparse_use_report
    if trt_log is None and report_kind == "converted":
        sparse = (engine.report().get("variants") or {}).get("sparse") or {}
        return torch_evidence(sparse.get("converted_layers") or [], sparse.get("not_converted") or [], pruned)
    if trt_log is None and report_kind != "picked":
        why = traits(engine.backend).no_sparse_note or "no sparse kernels were reported"
        raise MpdeployError(f"{engine.path}: backend {engine.backend} reports no per-layer sparse use ({why}: every "
                            "layer ran dense, giving them all back is the dense engine); for a later GPU target pass "
                            "--trt-log FILE from a TensorRT build of this ONNX")
    if trt_log is not None:
        report = _trt_report_from_file(Path(trt_log))
    else:
        report = (engine.report().get("variants") or {}).get("sparse")
        if report is None:
            raise MpdeployError(f"{engine.path} is a dense-only build: no sparse engine ran; build with --sparse")
    return trt_evidence(report, engine.onnx().sparsity().get("tensors") or [], pruned)


def weights_plan_evidence(weights: PrunedFolder, config: DensifyConfig) -> Evidence:
    """The plan of `config.backend` for the pruned model (which layers it converts to sparse), computed here
    from the weights (no engine, no GPU)."""
    from mpdeploy.backends.base import backend_class
    from mpdeploy.sparsity.pruned import load_pruned

    model = load_pruned(weights.path, "sparse", verify=False).model
    options = {"kernel": config.kernel, "conv1x1": config.conv1x1}
    _, plan = backend_class(config.backend).weights_plan(model, config.precision, options)
    evidence = torch_evidence([e["name"] for e in plan if e["convert"]],
                              [{"layer": e["name"], "reason": e["reason"]} for e in plan if not e["convert"]],
                              sparse_layer_names(weights.layers))
    evidence.source = f"{config.backend} conversion plan (computed on the pruned model; no engine)"
    return evidence


def gather(source, config: DensifyConfig) -> tuple[PrunedFolder, Evidence, dict[str, Path]]:
    """(the weights to densify, the evidence, the sources to record) for an opened input artifact."""
    if isinstance(source, EngineFolder):
        weights = source.weights()
        return weights, engine_evidence(source, weights, config.trt_log), {"weights": weights.path,
                                                                          "engine": source.path}
    if isinstance(source, OnnxFolder):
        weights = source.weights()
        if config.trt_log is None:
            raise MpdeployError(f"{source.path}: an onnx folder needs --trt-log FILE (a TensorRT build log of "
                                f"{OnnxFolder.MODELS['sparse']}) to tell which layers ran dense")
        tensors = source.sparsity().get("tensors") or []
        evidence = trt_evidence(_trt_report_from_file(Path(config.trt_log)), tensors,
                                sparse_layer_names(weights.layers))
        return weights, evidence, {"weights": weights.path, "onnx": source.path}
    if not traits(config.backend).plan_from_weights:
        planners = " or ".join(backends_with("plan_from_weights"))
        raise MpdeployError(f"{source.path} is a weights folder: pass --backend {planners} (its conversion plan is "
                            "computed here), or pass the engine folder whose report to read")
    return source, weights_plan_evidence(source, config), {"weights": source.path}


def reuse_config(weights: PrunedFolder, config: DensifyConfig) -> dict[str, Any]:
    """The output's `config`: the weights' own (prune) config plus this stage's, so readers of the
    prune settings (calib, permute, ...) still find them."""
    return {**(weights.config or {}), "densify": dataclasses.asdict(config)}


def file_inputs(config: DensifyConfig) -> dict[str, str]:
    """Hashes of the files the evidence was read from (the reuse key holds them)."""
    return {k: artifacts.sha256_file(Path(v)) for k, v in (("slow_layers", config.slow_layers),
                                                              ("trt_log", config.trt_log)) if v}


def default_out(path: Path) -> Path:
    return Path(path).parent / DEFAULT_DIR / "pruned"


def densify(path: Path, config: DensifyConfig, out: Path | None = None) -> DensifyResult:
    """Give the layers `path`'s report shows ran dense their dense weights back, into `out`."""
    source = open_input(Path(path))
    weights, evidence, sources = gather(source, config)
    if config.slow_layers:
        evidence = add_slow_layers(evidence, read_slow_layers(Path(config.slow_layers)), Path(config.slow_layers).name)
    out = Path(out) if out is not None else default_out(Path(path))
    if not evidence.ran_dense:
        logger.info("every pruned layer ran sparse (%s): nothing to give back", evidence.source)
        return DensifyResult(None, evidence, weights.path)
    _check_out(out, [Path(p) for p in sources.values()])
    write_densified(weights, evidence, out, reuse_config(weights, config), file_inputs(config), sources)
    logger.info("densified %d layers (%s) -> %s", len(evidence.ran_dense), evidence.source, out)
    return DensifyResult(out, evidence, weights.path)


def _check_out(out: Path, sources: list[Path]) -> None:
    dst = out.resolve()
    for src in sources:
        src = src.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise MpdeployError(f"--out {out} overlaps the input {src}; choose another folder")


def write_densified(weights: PrunedFolder, evidence: Evidence, out: Path, config: dict[str, Any],
                    inputs: dict[str, str], sources: dict[str, Path]) -> Path:
    """Write the new pruned artifact (atomically): tensors, masks, manifest with the `densify` record."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mpdeploy.densify.weights import densify_records, densify_state

    sparse = load_file(str(weights.weights_file("sparse")))
    dense = load_file(str(weights.weights_file("dense")))
    masks = {k: v.bool() for k, v in load_file(str(weights.masks_file)).items()}
    returned = dict(evidence.ran_dense)
    state, kept_masks = densify_state(sparse, dense, masks, list(returned))
    records, totals = densify_records(weights.layers, weights.totals, returned)
    extra = {k: v for k, v in weights.manifest.items() if k not in _MANIFEST_BASE}
    extra.update(layers=records, totals=totals, densify={
        "source_kind": weights.kind, "evidence": evidence.record(),
        "returned": [{"layer": k, "why": v} for k, v in returned.items()],
        "dense_source": weights.WEIGHTS["dense"],
    })
    with artifacts.atomic_dir(out, kind=KIND) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / weights.WEIGHTS["sparse"]))
        shutil.copyfile(weights.weights_file("dense"), tmp / weights.WEIGHTS["dense"])  # the dense source, as it was
        save_file({k: v.to(torch.uint8).contiguous() for k, v in kept_masks.items()}, str(tmp / weights.MASKS))
        artifacts.write_manifest(tmp, KIND, config, inputs=inputs, sources=sources, extra=extra, target=out)
    return out

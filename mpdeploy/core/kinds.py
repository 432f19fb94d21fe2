"""Typed artifact kinds: the only code that knows each artifact's file names and manifest fields.

    pruned/     PrunedFolder     model.safetensors, dense.safetensors, masks.safetensors
    distilled/  DistilledFolder  the same files, recovered weights; source "pruned"
    onnx/       OnnxFolder       model.onnx, model.dense.onnx, sparsity.json; source "weights"
    engine-*/   EngineFolder     one file per variant (named by its backend, listed in the manifest's
                                 `variants`), build_report.json; sources "onnx", "weights"
    audit/      AuditFolder      audit.json, audit.md, plots; sources "engine", "weights"
    (analysis)  AnalyzeFolder    spectra.json, summary.png, plots/
    screen/     ScreenFolder     accuracy.json; source "weights"                     (the sweep's)
    sweep/      SweepFolder      sweep.json, sweep.md, frontier.png                  (the sweep's)

The class constants (WEIGHTS, MASKS, MODELS, SPARSITY, REPORT, RESULT, ...) are the only spelling of
these file names: writers name their files with them too (tests/test_architecture.py checks that no
other module spells one).

`X.open(path)` verifies the folder (every listed file's hash, no unlisted file) and the whole chain
behind it (each recorded source unchanged since it was used, and every folder in it recording the
sources its kind requires, REQUIRES), and refuses anything else with a one-line MpdeployError: an
artifact that cannot say what it was made from is not followed half-way. Consumers open inputs here and
follow the sources (`weights()`, `onnx()`, `engine()`), never folder names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mpdeploy.core import artifacts, atomic
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.names import BACKENDS, ENGINE_PREFIX, PRECISIONS, engine_folder_name


@dataclass(frozen=True)
class ArtifactFolder:
    """One verified artifact folder and its manifest."""

    KIND: ClassVar[str] = ""
    REQUIRES: ClassVar[tuple[str, ...]] = ()  # the source roles every folder of this kind records
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str, verify: bool = True):
        """The folder, verified (with `verify`: its files and the chain behind it). Every folder opened,
        and with `verify` every one in its chain, must record the sources its kind requires."""
        path = Path(path)
        manifest = artifacts.read_manifest(path, cls.KIND, verify=verify)
        require_sources(path, manifest, chain=verify)
        return cls(path, manifest)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def config(self) -> Any:
        return self.manifest.get("config")

    @property
    def manifest_sha256(self) -> str:
        return artifacts.manifest_hash(self.path)

    @property
    def sources(self) -> dict[str, dict[str, str]]:
        """role -> {"path": relative to this folder, "manifest_sha256": ...}."""
        return dict(self.manifest.get("sources") or {})

    def source_path(self, role: str) -> Path | None:
        rec = self.sources.get(role)
        return None if rec is None else Path(self.path) / rec["path"]

    def required_source(self, role: str) -> Path:
        """A source its kind requires (checked at open; a folder made by hand is checked here)."""
        path = self.source_path(role)
        if path is None:
            require_sources(self.path, {**self.manifest, "kind": self.KIND}, chain=False)
            raise MpdeployError(f"{self.path} records no {role} source; re-create it with the stage that makes it")
        return path

    def file(self, rel: str) -> Path:
        """A file the manifest lists (so its hash was checked when the folder was opened)."""
        if rel not in (self.manifest.get("files") or {}):
            raise MpdeployError(f"{self.path}: its manifest lists no {rel}; re-create the artifact")
        return Path(self.path) / rel


@dataclass(frozen=True)
class PrunedFolder(ArtifactFolder):
    """Pruned weights, their dense twin and the masks (also the base of a distilled artifact)."""

    KIND: ClassVar[str] = "pruned"
    WEIGHTS: ClassVar[dict[str, str]] = {"sparse": "model.safetensors", "dense": "dense.safetensors"}
    MASKS: ClassVar[str] = "masks.safetensors"

    def weights_file(self, which: str = "sparse") -> Path:
        return self.file(self.WEIGHTS[which])

    @property
    def masks_file(self) -> Path:
        return self.file(self.MASKS)

    @property
    def model_info(self) -> dict[str, Any]:
        return dict(self.manifest.get("model") or {})

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers") or [])

    @property
    def totals(self) -> dict[str, Any]:
        return dict(self.manifest.get("totals") or {})


@dataclass(frozen=True)
class DistilledFolder(PrunedFolder):
    KIND: ClassVar[str] = "distilled"
    REQUIRES: ClassVar[tuple[str, ...]] = ("pruned",)

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.manifest.get("distill") or {})


def open_weights(path: Path | str, verify: bool = True, chain: bool = True) -> PrunedFolder:
    """A pruned or a distilled artifact (whichever the folder is): what export, engines and the audit read.

    `chain=False` checks the folder's own files only (a copy inside an engine folder, whose sources
    stayed behind: the engine's manifest hashes the copy)."""
    manifest = artifacts.read_manifest(Path(path), "pruned", verify=verify and chain)
    if verify and not chain:
        artifacts.verify_files(Path(path), manifest)
    require_sources(Path(path), manifest, chain=verify and chain)
    cls = DistilledFolder if manifest["kind"] == "distilled" else PrunedFolder
    return cls(Path(path), manifest)


@dataclass(frozen=True)
class OnnxFolder(ArtifactFolder):
    KIND: ClassVar[str] = "onnx"
    REQUIRES: ClassVar[tuple[str, ...]] = ("weights",)
    MODELS: ClassVar[dict[str, str]] = {"sparse": "model.onnx", "dense": "model.dense.onnx"}  # the FP32 files
    SPARSITY: ClassVar[str] = "sparsity.json"

    @classmethod
    def model_name(cls, variant: str, precision: str = "fp32") -> str:
        """`model.onnx` / `model.dense.onnx` for fp32; `model.fp16.onnx` / `model.dense.int8.onnx` otherwise."""
        if variant not in cls.MODELS:
            raise MpdeployError(f"unknown variant {variant!r}; use sparse or dense")
        if precision not in PRECISIONS:
            raise MpdeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        base = cls.MODELS[variant]
        return base if precision == "fp32" else f"{base.removesuffix('.onnx')}.{precision}.onnx"

    @property
    def sparse_model(self) -> Path:
        return self.file(self.MODELS["sparse"])

    @property
    def dense_model(self) -> Path:
        return self.file(self.MODELS["dense"])

    def sparsity(self) -> dict[str, Any]:
        return atomic.read_json(self.file(self.SPARSITY), what="sparsity record")

    def weights(self, verify: bool = False) -> PrunedFolder:
        """The weights this ONNX was exported from (verified with the chain when this was opened)."""
        return open_weights(self.required_source("weights"), verify=verify)


@dataclass(frozen=True)
class EngineFolder(ArtifactFolder):
    KIND: ClassVar[str] = "engine"
    REQUIRES: ClassVar[tuple[str, ...]] = ("onnx", "weights")
    SCHEMA: ClassVar[str] = "mpdeploy.engine/1"
    REPORT: ClassVar[str] = "build_report.json"

    @property
    def backend(self) -> str | None:
        return self.manifest.get("backend")

    @property
    def precision(self) -> str | None:
        return self.manifest.get("precision")

    def variant_files(self) -> dict[str, Path]:
        return {v: self.file(rel) for v, rel in (self.manifest.get("variants") or {}).items()}

    def report(self) -> dict[str, Any]:
        return atomic.read_json(self.file(self.REPORT), what="build report")

    def weights(self, verify: bool = False) -> PrunedFolder:
        """The exact weights this engine was built from (its recorded source)."""
        return open_weights(self.required_source("weights"), verify=verify)

    def onnx(self, verify: bool = False) -> OnnxFolder:
        return OnnxFolder.open(self.required_source("onnx"), verify=verify)


def engine_backends(root: Path) -> list[str]:
    """Backends with an `engine-<backend>/` folder under `root` (an engines/<name> folder): the known ones
    in BACKENDS order, then any others (so a caller can name them in its error)."""
    root = Path(root)
    known = [b for b in BACKENDS if (root / engine_folder_name(b)).is_dir()]
    others = sorted(p.name[len(ENGINE_PREFIX):] for p in root.glob(f"{ENGINE_PREFIX}*")
                    if p.is_dir() and p.name[len(ENGINE_PREFIX):] not in BACKENDS)
    return known + others


def engine_backend_present(root: Path, wanted: str) -> str:
    """`wanted`, checked: a known backend whose engine folder is under `root`."""
    if wanted not in BACKENDS:
        raise MpdeployError(f"unknown backend {wanted!r}; choose one of {', '.join(BACKENDS)}")
    present = engine_backends(root)
    if wanted not in present:
        raise MpdeployError(f"{root} has no {engine_folder_name(wanted)}/ (present: {', '.join(present) or 'none'}); "
                            "build it first or pick another backend")
    return wanted


@dataclass(frozen=True)
class AuditFolder(ArtifactFolder):
    KIND: ClassVar[str] = "audit"
    REQUIRES: ClassVar[tuple[str, ...]] = ("engine", "weights")
    SCHEMA: ClassVar[str] = "mpdeploy.audit/1"
    RESULT: ClassVar[str] = "audit.json"  # the record (schema SCHEMA)
    MARKDOWN: ClassVar[str] = "audit.md"  # the report a person reads
    PLOTS: ClassVar[dict[str, str]] = {"latency": "latency.png", "accuracy": "accuracy.png",
                                       "certified": "certified.png", "sensitivity": "sensitivity.png"}

    def result(self) -> dict[str, Any]:
        path = self.file(self.RESULT)
        data = atomic.read_json(path, what="audit")
        if not isinstance(data, dict) or data.get("schema") != self.SCHEMA:
            raise MpdeployError(f"{path} is not a {self.SCHEMA} audit; re-run mpdeploy audit")
        if data.get("passed") != self.manifest.get("passed"):
            raise MpdeployError(f"{path} disagrees with its manifest about the verdict; re-run mpdeploy audit")
        return data

    def engine(self) -> EngineFolder:
        """The engine audited (verified with the audit's chain when the audit was opened)."""
        return EngineFolder.open(self.required_source("engine"), verify=False)

    def weights(self) -> PrunedFolder:
        """The weights the engine was compared with (verified with the audit's chain)."""
        return open_weights(self.required_source("weights"), verify=False)


KINDS: dict[str, type[ArtifactFolder]] = {c.KIND: c for c in (PrunedFolder, DistilledFolder, OnnxFolder,
                                                        EngineFolder, AuditFolder)}


# --- sweep (mpdeploy.pipeline.sweep): the sweep's own artifacts -----------------------------------------------


@dataclass(frozen=True)
class ScreenFolder(ArtifactFolder):
    """A sweep's first look at pruned weights: accuracy.json (PyTorch, sparse vs dense); source "weights"."""

    KIND: ClassVar[str] = "screen"
    REQUIRES: ClassVar[tuple[str, ...]] = ("weights",)
    ACCURACY: ClassVar[str] = "accuracy.json"


@dataclass(frozen=True)
class SweepFolder(ArtifactFolder):
    """sweep.json, sweep.md, frontier.png; sources "audit:<trial>" / "screen:<trial>" for every row read."""

    KIND: ClassVar[str] = "sweep"
    TABLE: ClassVar[str] = "sweep.json"  # a row per trial
    MARKDOWN: ClassVar[str] = "sweep.md"  # the table and the choice
    FRONTIER: ClassVar[str] = "frontier.png"


KINDS.update({c.KIND: c for c in (ScreenFolder, SweepFolder)})


# --- analyze (mpdeploy.analyze): a look at a model, outside the chain ---------------------------------------


@dataclass(frozen=True)
class AnalyzeFolder(ArtifactFolder):
    """The Marchenko-Pastur fit of every layer: spectra.json, summary.png, a plot per layer under plots/."""

    KIND: ClassVar[str] = "analyze"
    SPECTRA: ClassVar[str] = "spectra.json"
    SUMMARY_PLOT: ClassVar[str] = "summary.png"
    LAYER_PLOTS: ClassVar[str] = "plots"  # a folder: NNNN_<layer>.png


KINDS[AnalyzeFolder.KIND] = AnalyzeFolder


def require_sources(path: Path, manifest: dict[str, Any], chain: bool = True) -> None:
    """Refuse a folder whose manifest lacks a source its kind requires (sources stripped, or written by an
    older mpdeploy); with `chain`, every folder behind it too (their manifests verified already)."""
    kind = KINDS.get(manifest.get("kind"))
    sources = manifest.get("sources") or {}
    missing = [role for role in (kind.REQUIRES if kind else ()) if role not in sources]
    if missing:
        raise MpdeployError(f"{path} records no {' and no '.join(missing)} source (stripped, or made by an older "
                            f"mpdeploy): nothing ties this {manifest['kind']} to what it was made from; "
                            "re-create it with the stage that makes it")
    if chain:
        for rec in sources.values():
            source = Path(os.path.normpath(Path(path) / rec["path"]))
            require_sources(source, atomic.read_json(source / artifacts.MANIFEST, what="manifest"), chain=True)

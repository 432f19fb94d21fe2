"""What an audit opens: the engine folder (verified), its weights source, the evaluation images, and
the batch sizes its engines can be timed at."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.names import engine_folder_name, traits
from mpdeploy.core.kinds import EngineFolder, PrunedFolder
from mpdeploy.onnx.graph_io import check_recorded_io

from mpdeploy.audit.common import Findings
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.engine import engine_files, io_spec, pick_backend

if TYPE_CHECKING:
    from mpdeploy.models.data import ImageData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditSubject:
    """One engine folder under audit and what it records: engine files, weights source, input shape."""

    root: Path  # engines/<name>/
    backend: str
    engine_dir: Path  # root/engine-<backend>/
    engine: EngineFolder
    files: dict[str, Path]  # "dense" / "sparse" -> engine file
    weights: PrunedFolder  # the weights it was built from (its recorded source)
    layers: list[dict[str, Any]]  # the weights source's layer records
    chw: tuple[int, ...]
    fixed_batch: int | None
    classes: int | None
    data_config: dict[str, Any]

    @property
    def manifest(self) -> dict[str, Any]:
        return self.engine.manifest

    @property
    def pruned(self) -> dict[str, Any]:
        """The weights source's manifest (pruned or distilled)."""
        return self.weights.manifest

    @property
    def pruned_dir(self) -> Path:
        return self.weights.path

    @property
    def precision(self) -> str | None:
        return self.manifest.get("precision")


def open_subject(engine_root: Path, backend: str | None) -> AuditSubject:
    """Open `engine_root/engine-<backend>/` and the weights it records as its source."""
    backend_name = pick_backend(engine_root, backend)
    engine_dir = engine_root / engine_folder_name(backend_name)
    engine = EngineFolder.open(engine_dir)  # every file hashed, nothing unlisted, its sources unchanged
    onnx = engine.onnx()
    if onnx is not None:  # the shapes below come from `io`: it must still be what the ONNX says
        check_recorded_io(engine_dir / artifacts.MANIFEST, engine.manifest.get("io"), onnx.sparse_model)
    files = engine_files(engine)
    weights = engine.weights()
    chw, fixed_batch, classes, data_config = io_spec(engine.manifest, weights.manifest)
    return AuditSubject(root=engine_root, backend=backend_name, engine_dir=engine_dir, engine=engine, files=files,
                        weights=weights, layers=weights.layers, chw=chw,
                        fixed_batch=fixed_batch, classes=classes, data_config=data_config)


def load_eval_data(config: AuditConfig, subject: AuditSubject, findings: Findings) -> ImageData:
    """The evaluation images, shaped for the engine's input."""
    from mpdeploy.models.data import load_images  # imports torch: only once an audit actually runs

    data = load_images(config.data, subject.chw, split="test", data_config=subject.data_config,
                       limit=config.max_eval_images or (256 if config.data == "synthetic" else None), seed=config.seed)
    if len(data) == 0:
        raise MpdeployError(f"evaluation data {config.data!r} holds no images; pass --data DIR|digits|synthetic")
    if data.kind in ("tensors", "imagefolder") and data.num_classes and subject.classes \
            and data.num_classes > subject.classes:  # refused before any work, as distill refuses it
        raise MpdeployError(f"--data {data.description} has labels up to {data.num_classes - 1} but the model has "
                            f"{subject.classes} outputs; pass images of the model's own classes")
    if data.synthetic:
        findings.warnings.append("synthetic N(0,1) inputs: accuracy numbers describe noise, not images; use --data DIR")
    return data


def timed_batch_sizes(config: AuditConfig, subject: AuditSubject, findings: Findings) -> list[int]:
    """The requested batch sizes the engines can run: a fixed-batch engine only its own, a TensorRT plan
    none beyond its optimization profile."""
    batch_sizes = list(config.batch_sizes)
    profile = ((subject.manifest.get("config") or {}).get("build") or {}).get("batch_sizes") or []
    fixed_batch = subject.fixed_batch
    if fixed_batch:
        if fixed_batch not in batch_sizes:
            findings.warnings.append(f"the engines take a fixed batch of {fixed_batch}: only that batch size was timed")
        batch_sizes = [fixed_batch]
    elif traits(subject.backend).batch_profile and profile and max(batch_sizes) > max(profile):
        # An optimization profile (a TensorRT plan's) ends at the largest batch it was built for.
        too_big = [b for b in batch_sizes if b > max(profile)]
        batch_sizes = [b for b in batch_sizes if b <= max(profile)] or [max(profile)]
        findings.warnings.append(f"batch sizes {too_big} are beyond the engine's optimization profile (built for "
                                 f"{profile}): not timed")
    return batch_sizes

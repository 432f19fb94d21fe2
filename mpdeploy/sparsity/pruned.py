"""Re-creating the models a pruned (or distilled) artifact holds: architecture + weights + masks.

Below the stages: backends (torch engines) and the audit load models through here, never through
mpdeploy.prune.stage. The folder is opened through mpdeploy.core.kinds, which verifies it and its sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import PrunedFolder, open_weights
from mpdeploy.models.load import recreate_architecture
from mpdeploy.sparsity.patterns import NM, parse_pattern


@dataclass
class PrunedArtifact:
    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    masks: dict[str, torch.Tensor]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["input_shape"])

    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    def patterns(self) -> dict[str, NM]:
        return {r["param"]: parse_pattern(r["pattern"]) for r in self.manifest["layers"] if r["pattern"]}


def build_architecture(manifest: dict[str, Any]) -> nn.Module:
    model = recreate_architecture(manifest["model"]["source"])
    tome = manifest.get("tome")
    if tome:
        from mpdeploy.sparsity.tome import apply_tome

        apply_tome(model, tome["r"])
    return model.eval()


def load_pruned(path: Path, which: str = "sparse", verify: bool = True, chain: bool = True) -> PrunedArtifact:
    """Re-create the pruned (or, with which="dense", the dense twin) model from the artifact.

    `verify` checks the folder's files and (with `chain`) the artifacts it was made from."""
    from safetensors.torch import load_file

    from mpdeploy.models.files import load_weights_strict

    path = Path(path)
    folder = open_weights(path, verify=verify, chain=chain)
    manifest = folder.manifest
    model = build_architecture(manifest)
    weights = folder.weights_file(which)
    try:
        state = load_file(str(weights))
        masks = {k: v.bool() for k, v in load_file(str(folder.masks_file)).items()}
    except Exception as exc:
        raise MpdeployError(f"{path}: cannot read {weights.name} / {PrunedFolder.MASKS} ({exc}); re-run `mpdeploy prune`") from None
    load_weights_strict(model, state, where=str(weights), arch=manifest["model"]["name"])
    check_input_shape(model.eval(), manifest, path)
    return PrunedArtifact(path, manifest, model.eval(), masks)


def check_input_shape(model: nn.Module, manifest: dict[str, Any], path: Path) -> None:
    """The manifest's input shape must be the one prune measured: run at it, every layer does the work
    (MACs, counted from real tensor shapes) its record says.

    Later stages export and build at `model.input_shape`, and a convolutional model runs at any H,W, so
    an edited shape would otherwise give a valid model of another input size. The per-layer MACs are
    what prune counted at its shape; the check needs no field but the ones the records already hold."""
    from mpdeploy.models.spec import bounded_input_shape
    from mpdeploy.sparsity.layers import count_macs

    shape = manifest["model"].get("input_shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise MpdeployError(f"{path}/{artifacts.MANIFEST}: model.input_shape {shape!r} is not a list of positive integers; "
                            "re-run `mpdeploy prune`")
    bounded_input_shape(shape)  # an absurd shape is refused before a tensor of it is allocated
    recorded = {r.get("name"): r.get("macs") for r in manifest.get("layers") or [] if isinstance(r, dict)}
    try:
        counted = count_macs(model, tuple(shape))
    except Exception as exc:  # noqa: BLE001 - the model's own forward refuses the shape (a ViT's patch grid)
        why = (str(exc).strip().splitlines() or [""])[0]
        raise MpdeployError(f"{path}: the model does not run at its recorded input shape {shape} "
                            f"({type(exc).__name__}: {why}); the manifest was edited: re-run `mpdeploy prune`") from None
    for name, macs in recorded.items():
        if type(macs) is int and counted.get(name, 0) != macs:
            raise MpdeployError(
                f"{path}: at its recorded input shape {shape} layer {name} does {counted.get(name, 0)} MACs, but "
                f"prune recorded {macs}: the manifest's input_shape or layer records were edited; re-run `mpdeploy prune`")


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight (after an optimizer step, masks must never drift)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            param = params[name]
            param.mul_(mask.to(device=param.device, dtype=param.dtype))

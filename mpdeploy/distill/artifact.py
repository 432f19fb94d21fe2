"""Writing the `distilled` artifact, and (tests) each rank's hash of its final weights."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mpdeploy.core import artifacts
from mpdeploy.core.kinds import PrunedFolder
from mpdeploy.distill.config import KIND, DistillConfig, reuse_config
from mpdeploy.distill.distributed import Dist

DUMP_ENV = "MPDEPLOY_TEST_DUMP_DIR"  # tests: each rank writes the hash of its final weights here

_MANIFEST_BASE = ("schema", "kind", "created", "tool_versions", "config", "config_hash", "inputs", "files",
                  "sources")


def state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dump_state_hash(state: dict[str, torch.Tensor], dist: Dist) -> None:
    """Under DUMP_ENV only: write this rank's weights hash, so a test can compare ranks."""
    if os.environ.get(DUMP_ENV):
        dump = Path(os.environ[DUMP_ENV])
        dump.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(dump / f"rank{dist.rank}.json", {"rank": dist.rank, "world": dist.world,
                                                              "state_sha256": state_hash(state)})


def write_artifact(pruned_dir: Path, target: Path, manifest: dict[str, Any], state: dict[str, torch.Tensor],
                   result: dict[str, Any], config: DistillConfig) -> None:
    """A new `distilled` artifact: the input's files with new student weights; source "pruned" = the input.

    The input's model, layers and totals are carried over (export and the audit read them); its prune
    config is recorded as `pruned_with` (and stays in the input, reached through the source)."""
    from safetensors.torch import save_file

    extra = {k: v for k, v in manifest.items() if k not in _MANIFEST_BASE}
    if "distill" in extra:  # distilled before: keep the earlier runs' records
        extra["distill_history"] = [*extra.get("distill_history", []), extra["distill"]]
    extra["distill"] = result
    # The prune config behind these weights (budget, saliency, pattern...): the audit and the report of a
    # distilled build show it even where the pruned artifact did not travel (an engine's weights copy).
    extra["pruned_with"] = manifest.get("config") if manifest.get("kind") == "pruned" else manifest.get("pruned_with")
    with artifacts.atomic_dir(target, kind=KIND) as tmp:
        for rel in manifest.get("files", {}):
            if rel != PrunedFolder.WEIGHTS["sparse"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pruned_dir / rel, tmp / rel)
        save_file(state, str(tmp / PrunedFolder.WEIGHTS["sparse"]))
        artifacts.write_manifest(tmp, KIND, reuse_config(config), extra=extra, sources={"pruned": pruned_dir},
                                 target=target)

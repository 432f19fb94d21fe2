"""Where trials meet: one folder per step under `<out>/steps/`, named by the step's config and its upstream step.

    steps/prune-<key>/pruned/            key: the model's content hash + the prune config
    steps/distill-<key>/distilled/       key: the prune step's key + the distill config
    steps/export-<key>/onnx/             key: the weights step's key + the export config
    steps/screen-<key>/screen/           key: the weights step's key + the evaluation (pruned accuracy)
    steps/engine-<key>/engine-<backend>/ key: the export step's key + backend, build config, GPU kind
    steps/engine-<key>/audit/            the audit of that engine (audit() writes beside the engine)

Two trials with the same step get the same folder, and the stage's own reuse rule (config hash + input
manifest hashes + every file verified) decides whether it is reused. The folder name only decides where
trials meet; a key never vouches for content. A step is made under a file lock beside its folder, so two
trials that need it at once build it once (the other waits, then reuses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts

STEPS = "steps"


def step_key(stage: str, upstream: str, config: Any) -> str:
    return artifacts.sha256_json({"stage": stage, "after": upstream, "config": artifacts.to_jsonable(config)})[:12]


@dataclass(frozen=True)
class Store:
    root: Path  # the sweep's --out; every node must see it at this path

    @property
    def steps(self) -> Path:
        return self.root / STEPS

    def step(self, stage: str, upstream: str, config: Any) -> tuple[str, Path]:
        """(key, folder) of a step: `steps/<stage>-<key>/`."""
        key = step_key(stage, upstream, config)
        return key, self.steps / f"{stage}-{key}"

    def relative(self, path: Path | None) -> str | None:
        return None if path is None else Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    @contextlib.contextmanager
    def lock(self, folder: Path) -> Iterator[None]:
        """Hold `steps/.<name>.lock` (an OS file lock: released if the holder is killed)."""
        from filelock import FileLock

        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            yield

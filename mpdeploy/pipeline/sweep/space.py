"""The search space (`--grid key=v1,v2 ...`), the objective (`--objective p50@b8`) and each trial's configs.

A trial is a dict of grid keys to values (strings as typed, so it is JSON, a Tune config and a stable id at
once). `trial_configs` turns it into the ordinary stage configs by replacing fields of the base configs the
command built from the same flags as `mpdeploy build`: a trial is exactly a build with those flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpdeploy.core.errors import MpdeployError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise MpdeployError(f"{text!r} is not a yes/no value; write true or false")


def _int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise MpdeployError(f"{text!r} is not an integer") from None
        if value < low:
            raise MpdeployError(f"{text!r} must be at least {low}")
        return value
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MpdeployError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise MpdeployError(f"{text!r} must be a fraction between 0 and 1")
    return value


def _patterns(text: str) -> tuple:
    from mpdeploy.sparsity.patterns import parse_pattern

    return tuple(parse_pattern(p) for p in text.split("+") if p.strip())


def _pattern(text: str):
    from mpdeploy.sparsity.patterns import parse_pattern

    return parse_pattern(text)


def _saliency(text: str) -> str:
    from mpdeploy.sparsity.saliency import get_saliency

    return get_saliency(text).name


def _budget(text: str) -> str:
    from mpdeploy.sparsity.budgets import get_budget

    get_budget(text)
    return text


def _precision(text: str) -> str:
    from mpdeploy.core.names import PRECISIONS

    if text not in PRECISIONS:
        raise MpdeployError(f"unknown precision {text!r}; choose one of {', '.join(PRECISIONS)}")
    return text


# grid key -> (which config, its field, parser). Keys are the `mpdeploy build` flag names.
GRID_KEYS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "pattern": ("prune", "pattern", _pattern),
    "extra-patterns": ("prune", "extra_patterns", _patterns),  # several joined by '+': 1:4+8:16
    "budget": ("prune", "budget", _budget),
    "saliency": ("prune", "saliency", _saliency),
    "target-mac-reduction": ("prune", "target_mac_reduction", _fraction),
    "tome": ("prune", "tome", _int(0)),
    "restore": ("prune", "restore", _bool),
    "permute": ("prune", "permute", _bool),
    "prune-head": ("prune", "include_head", _bool),
    "distill-epochs": ("distill", "epochs", _int(0)),
    "precision": ("build", "precision", _precision),
}
_KEY_RE = re.compile(r"^([a-z][a-z0-9-]*)=(.+)$")


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`["pattern=2:4", "saliency=magnitude,wanda"]` -> {"pattern": ["2:4"], "saliency": ["magnitude", "wanda"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        match = _KEY_RE.match(item.strip())
        if not match:
            raise MpdeployError(f"--grid item {item!r} must be KEY=V1,V2,..., e.g. saliency=magnitude,wanda")
        key, raw = match.group(1).replace("_", "-"), match.group(2)
        if key not in GRID_KEYS:
            raise MpdeployError(f"--grid key {key!r} is not one of {', '.join(GRID_KEYS)}")
        if key in grid:
            raise MpdeployError(f"--grid names {key} twice; give all its values at once: {key}=V1,V2")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if len(set(values)) != len(values):
            raise MpdeployError(f"--grid {key} repeats a value ({raw})")
        for value in values:
            try:
                GRID_KEYS[key][2](value)
            except MpdeployError as exc:
                raise MpdeployError(f"--grid {key}: {exc}") from None
        grid[key] = values
    return grid


def expand(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination, in the order the keys and values were given (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def trial_id(values: Mapping[str, str]) -> str:
    """A short stable name of a trial's values (the same on every run: rows, resume, logs)."""
    text = json.dumps(dict(sorted(values.items())), sort_keys=True)
    return "t" + hashlib.sha256(text.encode()).hexdigest()[:8]


def describe(values: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "(the base flags)"


@dataclass(frozen=True)
class Objective:
    """What the choice minimises or maximises: the sparse engine's p50 / p99 (ms) or throughput at one batch."""

    stat: str  # "p50" | "p99" | "throughput"
    batch: int

    @property
    def mode(self) -> str:
        return "max" if self.stat == "throughput" else "min"

    @property
    def unit(self) -> str:
        return "img/s" if self.stat == "throughput" else "ms"

    @property
    def label(self) -> str:
        return f"{self.stat}@b{self.batch}"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def of(self, stats: Mapping[str, Any]) -> float | None:
        """The statistic of one engine's latency record (audit.json's latency[b][variant])."""
        key = "throughput" if self.stat == "throughput" else self.stat
        value = stats.get(key) if isinstance(stats, Mapping) else None
        return float(value) if isinstance(value, (int, float)) else None


_OBJECTIVE_RE = re.compile(r"^(p50|p99|throughput)@b(\d+)$")


def parse_objective(text: str) -> Objective:
    match = _OBJECTIVE_RE.match(text.strip())
    if not match or int(match.group(2)) < 1:
        raise MpdeployError(f"--objective {text!r} must be p50@bN, p99@bN or throughput@bN, e.g. p50@b8")
    return Objective(match.group(1), int(match.group(2)))


@dataclass(frozen=True)
class TrialConfigs:
    prune: Any  # PruneConfig
    distill: Any | None  # DistillConfig, or None for no recovery
    export: Any  # ExportConfig
    build: Any  # BuildConfig


def trial_configs(values: Mapping[str, str], prune, distill_template, export, build, backend: str) -> TrialConfigs:
    """The stage configs of one trial: the base configs with the trial's values, prepared for `backend` the way
    `mpdeploy build` prepares them (export at the engine precision, prune for what the backend runs sparse)."""
    fields: dict[str, dict[str, Any]] = {"prune": {}, "distill": {}, "build": {}}
    for key, raw in values.items():
        where, name, parse = GRID_KEYS[key]
        fields[where][name] = parse(raw)
    prune = dataclasses.replace(prune, **fields["prune"])
    build = dataclasses.replace(build, **fields["build"])
    epochs = fields["distill"].get("epochs", distill_template.epochs if distill_template else 0)
    distill = None
    if epochs:
        if distill_template is None:
            from mpdeploy.distill.config import DistillConfig

            distill = DistillConfig(data="digits", epochs=epochs)
        else:
            distill = dataclasses.replace(distill_template, epochs=epochs)
    return _for_backend(TrialConfigs(prune, distill, export, build), backend)


def _for_backend(configs: TrialConfigs, backend: str) -> TrialConfigs:
    """As run_build does before its stages (kept in step with mpdeploy.pipeline.build.run_build)."""
    from mpdeploy.backends.base import create_backend
    from mpdeploy.pipeline.build import export_for, prune_for
    from mpdeploy.engine.stage import options_for

    build = options_for(backend, configs.build)
    precision = create_backend(backend).resolve_precision(build)
    return TrialConfigs(prune_for(configs.prune, backend, precision, build), configs.distill,
                        export_for(configs.export, backend, precision, build), build)

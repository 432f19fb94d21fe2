"""The audit's options: one frozen AuditConfig, validated when it is made (before any work)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError

# Fields that record how a run happened, not what it measures: left out of the reuse key (and the manifest's
# config), so an audit made on one node is reused by a re-run placed on another.
RUN_ONLY_FIELDS = ("placement",)


@dataclass(frozen=True)
class AuditConfig:
    data: str = "digits"  # "digits" | "synthetic" | ImageFolder DIR
    backend: str | None = None  # which engine-<backend>/ to audit; None = the only / first usable one
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 10  # at most this many calls per engine and batch size before timing (adaptive)
    repeats: int = 30  # at most this many interleaved rounds per batch size
    calls_per_round: int = 3  # back-to-back calls of one engine inside a round
    # Adaptive timing (audit/timing.py): rounds stop once the speed ratio's 95% interval is within
    # +-ratio_tolerance, or the batch's share of time_budget_s is spent, but never before min_rounds.
    min_rounds: int = 5
    ratio_tolerance: float | None = 0.02
    time_budget_s: float | None = 120.0  # accuracy 35%, timing 45% (over batch sizes), sensitivity 20%; None: no bound
    eval_workers: int | None = None  # DataLoader workers for the evaluation data; None: auto
    max_eval_images: int | None = None
    max_top1_drop: float = 0.02  # absolute, as a fraction (0.02 = 2 points)
    min_speedup: float | None = None  # None = no required speedup (the default gate below still applies)
    # Where the backend has sparse kernels: fail when the sparse engine is measurably slower than its dense
    # twin (ratio interval entirely below 1.0); False makes that a warning. No measurable speedup always warns.
    fail_if_slower: bool = True
    sensitivity_batch: int = 16  # images for the per-layer sensitivity; 0 skips it
    sensitivity: bool = True  # False (--no-sensitivity) skips the per-layer map
    sensitivity_max_layers: int | None = 24  # a spread subset of the pruned layers; None: all
    plots: bool = True
    seed: int = 0
    # Who ran this audit, set by the caller (the sweep: its Ray node id and IP); recorded in audit.json under
    # device.host.placement. The audit never looks at it: stages do not know what schedules them.
    placement: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.placement is not None:  # plain JSON data now, not at write time after the work
            object.__setattr__(self, "placement", artifacts.to_jsonable(dict(self.placement)))
        sizes = tuple(int(b) for b in self.batch_sizes)
        if not sizes or min(sizes) < 1:
            raise MpdeployError("batch sizes must be positive integers, e.g. --batch-sizes 1,8,32")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        if self.warmup < 0 or self.repeats < 1 or self.calls_per_round < 1:
            raise MpdeployError("--warmup must be >= 0, --repeats and calls per round >= 1")
        if self.max_eval_images is not None and self.max_eval_images < 1:
            raise MpdeployError(f"--max-eval-images must be at least 1, not {self.max_eval_images}")
        if not 0.0 <= self.max_top1_drop <= 1.0:
            raise MpdeployError(
                f"--max-top1-drop is a fraction in [0, 1] (0.02 = 2 points), not {self.max_top1_drop}"
            )
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise MpdeployError(f"--min-speedup must be positive (e.g. 1.1), not {self.min_speedup}")
        if self.min_rounds < 2 or (self.ratio_tolerance is not None and not self.ratio_tolerance > 0) \
                or (self.time_budget_s is not None and self.time_budget_s < 0):
            raise MpdeployError("--min-rounds must be >= 2, --ratio-tolerance > 0 and --time-budget >= 0 (0: no bound)")
        if self.sensitivity_batch < 0:
            raise MpdeployError(f"--sensitivity-batch must be >= 0 (0 skips it), not {self.sensitivity_batch}")


def reuse_config(config: AuditConfig) -> dict[str, Any]:
    """The config an audit manifest and audit.json record and its reuse key hashes (run-only fields left out)."""
    return {k: v for k, v in artifacts.to_jsonable(asdict(config)).items() if k not in RUN_ONLY_FIELDS}

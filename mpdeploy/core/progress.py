"""Progress of long steps as log lines: one line every few seconds per step, with rate and time left.

Long steps report through a callback `progress(step, done, total, **fields)`. `ProgressLog` is such a
callback: it logs "stage: step done/total (pct) rate, ETA" at most every `interval_s` seconds per step
(and when a step completes), then forwards the call to an optional display (the CLI's rich bar). A
log, not a bar, is what a CI job or a redirected build shows while an audit runs for minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Progress = Callable[..., None]
DEFAULT_INTERVAL_S = 5.0


@dataclass
class _StepState:
    started: float
    last_log: float
    done_at_start: int


def format_duration(seconds: float) -> str:
    """3 s, 2 min 05 s, 1 h 02 min."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_fields(done: int, total: int, elapsed: float, done_since_start: int) -> dict[str, float | None]:
    """Rate (units per second since the step started) and the estimated seconds left."""
    rate = done_since_start / elapsed if elapsed > 0 and done_since_start > 0 else None
    eta = (max(total - done, 0) / rate) if rate else None
    return {"rate": rate, "eta_s": eta}


class ProgressLog:
    """A progress callback that logs each step at most every `interval_s` seconds, then forwards the call."""

    def __init__(self, stage: str, interval_s: float = DEFAULT_INTERVAL_S, forward: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic, log: logging.Logger | None = None,
                 enabled: bool = True) -> None:
        self.stage, self.interval_s, self.forward, self.clock = stage, interval_s, forward, clock
        self.log = log or logger
        self.enabled = enabled
        self._steps: dict[str, _StepState] = {}

    def __call__(self, step: str, done: int, total: int, **fields: object) -> None:
        if self.enabled:
            self._maybe_log(step, int(done), int(total), fields)
        if self.forward is not None:
            self.forward(step, done, total, **fields)

    def _maybe_log(self, step: str, done: int, total: int, fields: dict[str, object]) -> None:
        now = self.clock()
        state = self._steps.get(step)
        if state is None or done < state.done_at_start:  # a new step, or the same name started over
            # The first call starts the step's clock and says the step began (a slow first batch
            # would otherwise leave the log silent for a long time).
            self._steps[step] = state = _StepState(started=now, last_log=now, done_at_start=done)
            if done < total or total == 0:
                self.log.info("%s: %s %d/%d started", self.stage, step, done, total)
                return
        finished = total > 0 and done >= total
        if not finished and now - state.last_log < self.interval_s:
            return
        state.last_log = now
        self.log.info("%s", self.line(step, done, total, now - state.started, done - state.done_at_start, fields))
        if finished:
            del self._steps[step]

    def line(self, step: str, done: int, total: int, elapsed: float, done_since_start: int,
             fields: dict[str, object]) -> str:
        stats = progress_fields(done, total, elapsed, done_since_start)
        parts = [f"{self.stage}: {step} {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total else "")]
        if stats["rate"] is not None:
            parts.append(f"{stats['rate']:.3g}/s")
        if done >= total > 0:
            parts.append(f"done in {format_duration(elapsed)}")
        elif stats["eta_s"] is not None:
            parts.append(f"ETA {format_duration(stats['eta_s'])}")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
        return ", ".join(parts)


def progress_log(progress: Progress | None, stage: str, interval_s: float = DEFAULT_INTERVAL_S) -> Progress:
    """The callback a library step should use: the caller's display when there is one (it logs, see
    commands/_progress.py), else a ProgressLog so a library user still sees the step's log lines."""
    if progress is not None:
        return progress
    return ProgressLog(stage, interval_s)

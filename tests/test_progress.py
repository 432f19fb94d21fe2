"""Progress log lines: at the interval, with the right counts, rate and time left (fake clock)."""

from __future__ import annotations

import logging

import pytest

from mpdeploy.core.progress import ProgressLog, format_duration, progress_log


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_the_interval_with_counts_rate_and_eta(caplog):
    clock = FakeClock()
    log = ProgressLog("audit", interval_s=5.0, clock=clock)
    caplog.set_level(logging.INFO, logger="mpdeploy.core.progress")
    for done in range(0, 101):  # one image per second, 100 images
        log("accuracy", done, 100)
        clock.now += 1.0
    lines = [r.getMessage() for r in caplog.records]
    # Called at t = 0..100 s: a line when it starts, at 5, 10, ..., 95 s, and one when done.
    assert len(lines) == 21
    assert lines[0] == "audit: accuracy 0/100 started"
    assert lines[1] == "audit: accuracy 5/100 (5%), 1/s, ETA 1 min 35 s"
    assert lines[2] == "audit: accuracy 10/100 (10%), 1/s, ETA 1 min 30 s"
    assert lines[-1] == "audit: accuracy 100/100 (100%), 1/s, done in 1 min 40 s"


def test_steps_are_independent_and_fields_are_shown(caplog):
    clock = FakeClock()
    seen = []
    log = ProgressLog("build", interval_s=2.0, clock=clock, forward=lambda *a, **k: seen.append((a, k)))
    caplog.set_level(logging.INFO, logger="mpdeploy.core.progress")
    log("distill", 0, 10)
    log("latency b1", 0, 4)
    clock.now += 3.0
    log("distill", 3, 10, loss=0.25)
    log("latency b1", 1, 4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["build: distill 0/10 started", "build: latency b1 0/4 started",
                     "build: distill 3/10 (30%), 1/s, ETA 7 s, loss=0.25",
                     "build: latency b1 1/4 (25%), 0.333/s, ETA 9 s"]
    assert len(seen) == 4 and seen[2] == (("distill", 3, 10), {"loss": 0.25})


def test_disabled_log_only_forwards(caplog):
    clock, seen = FakeClock(), []
    log = ProgressLog("audit", clock=clock, enabled=False, forward=lambda *a, **k: seen.append(a))
    caplog.set_level(logging.INFO, logger="mpdeploy.core.progress")
    log("x", 1, 1)
    assert not caplog.records and seen == [("x", 1, 1)]


def test_progress_log_passes_a_display_through():
    display = lambda *a, **k: None  # noqa: E731
    assert progress_log(display, "audit") is display
    assert isinstance(progress_log(None, "audit"), ProgressLog)


def test_format_duration():
    assert format_duration(4.4) == "4 s"
    assert format_duration(125) == "2 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_cli_stage_progress_logs_when_not_a_terminal(caplog):
    from mpdeploy.commands.progress import stage_progress

    caplog.set_level(logging.INFO, logger="mpdeploy.core.progress")
    with stage_progress("audit", interval_s=0.0, interactive=False) as progress:
        progress("sensitivity", 0, 2)
        progress("sensitivity", 2, 2)
    assert any(r.getMessage().startswith("audit: sensitivity 2/2 (100%)") for r in caplog.records)

"""Progress display for long stages (CLI only: the library reports through callbacks).

On a terminal: one rich bar per step (done/total, elapsed, time left, extra fields). Elsewhere (CI,
a redirected log): the same steps as log lines every few seconds (mpdeploy.core.progress.ProgressLog).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from mpdeploy.core.progress import DEFAULT_INTERVAL_S, ProgressLog


@contextlib.contextmanager
def stage_progress(description: str, interval_s: float = DEFAULT_INTERVAL_S,
                   interactive: bool | None = None) -> Iterator[Callable[..., None]]:
    """Yield a `(step, done, total, **fields)` callback that drives one rich progress bar per step on a
    terminal, or logs a line per step every `interval_s` seconds when stderr is not one; fields
    (e.g. loss=0.31, images_per_s=850) are shown after the bar / at the end of the line."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    tty = sys.stderr.isatty() if interactive is None else interactive
    console = Console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{description}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not tty,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(step: str, done: int, total: int, **fields: object) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total, info=info)
            bar.update(tasks[step], completed=done, total=total, info=info)

        # The bar shows progress on a terminal; the log lines carry it everywhere else.
        yield ProgressLog(description, interval_s, forward=update if tty else None, enabled=not tty)

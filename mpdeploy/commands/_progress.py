"""Progress display for long stages (CLI only: the library reports through callbacks)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def stage_progress(description: str) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a `(step, done, total, **fields)` callback that drives one rich progress bar per step;
    fields (e.g. loss=0.31, images_per_s=850) are shown after the bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{description}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not sys.stderr.isatty(),
    ) as bar:
        tasks: dict[str, int] = {}

        def update(step: str, done: int, total: int, **fields: object) -> None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total, info=info)
            bar.update(tasks[step], completed=done, total=total, info=info)

        yield update

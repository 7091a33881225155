"""Console progress bars (rich) for long work: count, rate and time left, on stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(description: str, total: int, unit: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``update(advance=0, completed=None)``. Disabled, or stderr not a terminal: a no-op,
    so that the logs of batch jobs are not flooded with redraws."""
    if not enabled or not sys.stderr.isatty():
        yield lambda advance=0, completed=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "")

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               Rate(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)

        def update(advance: int = 0, completed: int | None = None) -> None:
            bar.update(task, advance=advance or None, completed=completed)

        yield update

"""Console progress bars (rich) for long work: count, rate and time left, on stderr."""

from __future__ import annotations

import sys
import threading
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


class spark_progress:
    """A console bar of the units (files, events) done, estimated from the tasks Spark's status
    tracker reports complete in this run's job group (tasks are of about equal size)."""

    def __init__(self, spark, description: str, n_tasks: int, n_units: int, unit: str, enabled: bool):
        self.tracker = spark.sparkContext.statusTracker()
        self.group = spark.sparkContext.getLocalProperty("spark.jobGroup.id")
        self.description, self.unit, self.enabled = description, unit, enabled
        self.n_tasks, self.n_units = n_tasks, n_units
        self.stop = threading.Event()
        self.done_before = self._done_tasks() if enabled else 0

    def __enter__(self):
        self.bar = progress_bar(self.description, self.n_units, self.unit, enabled=self.enabled)
        self.update = self.bar.__enter__()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        if self.enabled:
            self.thread.start()
        return self

    def _done_tasks(self) -> int:
        done = 0
        for job in self.tracker.getJobIdsForGroup(self.group):
            info = self.tracker.getJobInfo(job)
            for stage in info.stageIds if info else ():
                s = self.tracker.getStageInfo(stage)
                done += s.numCompletedTasks if s else 0
        return done

    def _poll(self):
        while not self.stop.wait(0.5):
            done = min(self._done_tasks() - self.done_before, self.n_tasks)
            self.update(completed=round(self.n_units * done / self.n_tasks))

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if exc[0] is None:
            self.update(completed=self.n_units)
        self.bar.__exit__(*exc)

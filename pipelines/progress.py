"""Progress display, in one place: a console sized for terminals and logs, a bar for long loops (each
long step calls `update(message, done, total)`), and the live status line of a sweep."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

Update = Callable[[str, int, int], None]   # (what is happening, steps done, steps in all)


def console(width: int = 200) -> Console:
    """A console that wraps at the terminal's width, or at `width` when the output is a file or a pipe."""
    return Console(width=None if sys.stdout.isatty() else width)


@contextmanager
def bar(out: Console, unit: str = "", start: str = "starting") -> Iterator[Update]:
    """A transient progress bar; the block gets its `update(message, done, total)`. Where the output is
    not a terminal (a log, a pipe, `nohup`), a bar would show nothing: each new message is a line instead."""
    suffix = f" {unit}" if unit else ""
    if not out.is_terminal:
        yield _lines(out, suffix)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}" + suffix),
                  TimeElapsedColumn(), console=out, transient=True) as progress:
        task = progress.add_task(start, total=None)
        yield lambda message, done, total: progress.update(task, description=message, completed=done, total=total)


def _lines(out: Console, suffix: str) -> Update:
    import time

    start, last = time.monotonic(), [None]

    def update(message: str, done: int, total: int) -> None:
        if message != last[0]:
            last[0] = message
            elapsed = int(time.monotonic() - start)
            out.print(f"[{elapsed // 60:d}:{elapsed % 60:02d}] {message} ({done}/{total}{suffix})", highlight=False)
    return update


class SweepProgress:
    """A live line per sweep: trials done / running / pending, failures, best so far. Call it with the
    driver's records (trial key -> pipelines.sweeps.driver.TrialRecord) whenever they change."""

    def __init__(self, total: int, out: Console):
        self.total = total
        self.live = Live(self._render({}), console=out, refresh_per_second=2, transient=False)

    def _render(self, records) -> Table:
        from pipelines.sweeps.summary import higher_is_better

        done = sum(r.status == "FINISHED" for r in records.values())
        failed = sum(r.status == "FAILED" for r in records.values())
        running = sum(r.status == "RUNNING" for r in records.values())
        best, best_key = None, "-"
        for key, r in records.items():
            metric = r.final.get("metric")
            value = r.final.get(f"val_{metric}") if metric else None
            sign = 1 if higher_is_better(metric or "") else -1
            if isinstance(value, (int, float)) and (best is None or sign * value > sign * best):
                best, best_key = value, f"{key} (val {metric} {value:.3f})"
        table = Table.grid(padding=(0, 2))
        table.add_row(f"[bold]trials[/] {done + failed}/{self.total} done", f"{running} running",
                      f"{self.total - done - failed - running} pending", f"[red]{failed} failed[/]" if failed else "",
                      f"best so far: {best_key}")
        return table

    def __call__(self, records) -> None:
        self.live.update(self._render(records))

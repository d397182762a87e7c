"""Progress bars (rich, on stderr): how every long stage shows its progress.

On a terminal it is a live bar. When stderr is a file or a pipe (nohup, CI, a cluster job's
log) a live bar draws nothing until it ends, so instead a plain line per running task is
printed at a steady interval (`RANKONE_PROGRESS_INTERVAL` seconds, default 10): step,
total, the task's own numbers (loss), rate, time left. A bar whose work fails is cleared
instead of drawn one last time, so a failed stage leaves its one error line on stderr.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from rich.progress import Progress, Task

INTERVAL_ENV = "RANKONE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plain_line(task: Task) -> str:
    """One task's progress as text for a log: `adapt: 120/1000, loss 3.2101, 41.2 img/s, 0:01:02 elapsed, 0:07:30 left`."""
    parts = [f"{task.description}: {task.completed:g}/{task.total:g}" if task.total else f"{task.description}: {task.completed:g}"]
    for name, value in task.fields.items():
        if name == "rate":  # adaptation's own throughput field
            parts.append(f"{value:.1f} img/s")
        else:
            parts.append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
    if "rate" not in task.fields and task.speed:
        parts.append(f"{task.speed:.1f}/s")
    parts.append(f"{_duration(task.elapsed)} elapsed")
    if not task.finished:
        parts.append(f"{_duration(task.time_remaining)} left")
    return ", ".join(parts)


def interval() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)), 0.05)
    except ValueError:
        return DEFAULT_INTERVAL_S


@contextlib.contextmanager
def shown(progress: Progress) -> Iterator[Progress]:
    """`with progress:`, printing plain lines when stderr is no terminal, and leaving no bar behind when the block raises."""
    console = progress.console
    plain = not console.is_terminal and not progress.disable
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(interval()):
            for task in progress.tasks:
                if not task.finished:
                    console.print(plain_line(task), markup=False, highlight=False, soft_wrap=True)

    if not plain:
        with progress:
            try:
                yield progress
            except BaseException:
                progress.live.transient = True
                raise
        return
    # No live display at all: rich would draw the bar once more when it stops.
    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield progress
    finally:
        stop.set()
        reporter.join()
    for task in progress.tasks:
        console.print(plain_line(task), markup=False, highlight=False, soft_wrap=True)

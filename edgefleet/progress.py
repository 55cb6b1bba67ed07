"""Progress of the long operator commands (model build/quantize/prune/distill/evaluate/cascade, the
benches): the one place that decides how it is shown.

Library functions take a `Reporter` by name (`progress=`), the quiet one by default, so tests and
library callers print nothing; the CLI passes the one `shown()` gives, which draws rich progress bars
on a terminal and nothing on a pipe, a CI log or a test's captured output (a redrawn bar there is only
noise). Either way a command ends with one summary line, `Reporter.summary`.

A step with a count (images read, training steps, layers probed, bench rounds) is a task with a total
and advances by what is done; a step without one (an export, one ONNX Runtime quantize call) is a task
without a total, shown as a spinner with its name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as RichTask
from rich.text import Text


class Task:
    """One step under way: what it is, how much of it there is (None: no count) and how much is done."""

    def __init__(self, reporter: Reporter, name: str, total: int | None) -> None:
        self.name, self.total, self.completed = name, total, 0
        self._reporter = reporter

    def advance(self, amount: int = 1) -> None:
        """Counts `amount` more units of the step as done (a step without a total just counts them)."""
        self.completed += amount
        self._reporter._advanced(self, amount)


class Reporter:
    """The quiet reporter: its tasks count, nothing is shown. Library functions' default; `RichReporter`
    shows the same steps."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.line: str | None = None  # the last summary

    @contextmanager
    def task(self, name: str, total: int | None = None) -> Iterator[Task]:
        """A step for the block.

        Args:
            name: what the step does, for a person ("reading 300 held-out images").
            total: units the step advances through; None for a step without a count (a spinner).

        Yields:
            The Task; call `advance()` as units are done.
        """
        step = Task(self, name, total)
        self._began(step)
        try:
            yield step
        finally:
            self._ended(step)

    def summary(self, line: str) -> str:
        """The command's one closing line: `line` and the time since the reporter was made.

        Returns:
            The line as shown ("quantized … in 41 s").
        """
        self.line = f"{line} in {elapsed(time.monotonic() - self.started)}"
        return self.line

    # What a display does as steps begin, advance and end (nothing here).
    def _began(self, step: Task) -> None:
        pass

    def _advanced(self, step: Task, amount: int) -> None:
        pass

    def _ended(self, step: Task) -> None:
        pass


# The library functions' default: nothing shown, nothing kept but the last summary line.
QUIET = Reporter()


class RichReporter(Reporter):
    """Rich progress bars on `console` when it is a terminal; elsewhere nothing but the summary line."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        # Transient: the bars go when the command ends, its tables and summary stay.
        self.bars = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Count(), TimeElapsedColumn(),
            console=console, transient=True, disable=not console.is_terminal,
        )
        self._ids: dict[int, TaskID] = {}

    def _began(self, step: Task) -> None:
        self._ids[id(step)] = self.bars.add_task(step.name, total=step.total)

    def _advanced(self, step: Task, amount: int) -> None:
        self.bars.advance(self._ids[id(step)], amount)

    def _ended(self, step: Task) -> None:
        self.bars.remove_task(self._ids.pop(id(step)))

    def summary(self, line: str) -> str:
        shown = super().summary(line)
        # soft_wrap: one line however narrow the terminal; no highlighting of numbers in a log.
        self.console.print(shown, soft_wrap=True, highlight=False, markup=False)
        return shown

    def __enter__(self) -> RichReporter:
        self.bars.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bars.stop()


class _Count(MofNCompleteColumn):
    """'12/300' for a step with a count; nothing for a spinner's step (rich would show '0/?')."""

    def render(self, task: RichTask) -> Text:
        return Text("") if task.total is None else super().render(task)


@contextmanager
def shown(console: Console | None = None) -> Iterator[RichReporter]:
    """The CLI's reporter for one command: bars on standard error while the block runs (standard output
    keeps the tables), stopped however it ends.

    Args:
        console: where to draw (default: standard error).
    """
    with RichReporter(console or Console(stderr=True)) as reporter:
        yield reporter


def elapsed(seconds: float) -> str:
    """'41 s', '3 min 5 s': a duration for the summary line."""
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"

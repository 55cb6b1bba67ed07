"""edgefleet.progress: tasks count what is done, a terminal gets bars, a pipe gets nothing but the one
summary line, and library functions stay quiet by default while counting through a reporter passed in."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from edgefleet.models import dataset
from edgefleet.progress import QUIET, Reporter, RichReporter, elapsed

LONG = "quantized efficientnet-lite0 → var/models/efficientnet-lite0-int8-static-minmax: 3.4 MB (was 13.2), " \
       "held-out agreement 95.3% on 150 images (gate 90%) ✓"


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=60), out


def test_a_task_counts_what_is_advanced_against_its_total():
    reporter = Reporter()
    with reporter.task("reading 5 images", 5) as reading:
        reading.advance()
        reading.advance(3)
    with reporter.task("exporting") as exporting:
        pass
    assert (reading.name, reading.total, reading.completed) == ("reading 5 images", 5, 4)
    assert (exporting.total, exporting.completed) == (None, 0)


def test_the_summary_line_says_how_long_the_command_took():
    reporter = Reporter()
    reporter.started -= 41.2  # as if the command began 41 s ago
    assert reporter.summary("built x") == "built x in 41 s" == reporter.line


@pytest.mark.parametrize(("seconds", "shown"), [(0.04, "0.0 s"), (3.25, "3.2 s"), (41.4, "41 s"), (185, "3 min 5 s")])
def test_durations_read_as_a_person_says_them(seconds, shown):
    assert elapsed(seconds) == shown


def test_off_a_terminal_only_the_summary_line_is_printed_whole_on_one_line():
    console, out = _console(terminal=False)
    with RichReporter(console) as reporter:
        with reporter.task("reading 300 held-out images", 300) as reading:
            reading.advance(300)
        with reporter.task("calibrating and quantizing"):
            pass
        shown = reporter.summary(LONG)
    # No bar, no spinner, no escape codes: one line, unwrapped although longer than the console is wide.
    assert out.getvalue() == shown + "\n"
    assert shown.startswith(LONG + " in ") and len(shown) > console.width


def test_on_a_terminal_the_bars_show_each_step_and_its_count_then_go():
    console, out = _console(terminal=True)
    with RichReporter(console) as reporter:
        with reporter.task("reading 3 images", 3) as reading:
            reading.advance(2)
            (bar,) = reporter.bars.tasks
            assert (bar.description, bar.total, bar.completed) == ("reading 3 images", 3, 2)
            reporter.bars.refresh()
        with reporter.task("exporting to ONNX"):
            reporter.bars.refresh()
        assert reporter.bars.tasks == []  # an ended step leaves the display
        reporter.summary("built")
    drawn = out.getvalue()
    assert "reading 3 images" in drawn and "2/3" in drawn and "exporting to ONNX" in drawn
    assert "0/?" not in drawn  # a step without a count shows no count
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn).replace("\r", "\n").splitlines()
    assert "built in 0.0 s" in lines  # a line of its own, above the bars (which then go)


def test_a_library_function_counts_through_the_reporter_it_is_given_and_is_quiet_without_one(tmp_path, capsys):
    seen: list[tuple[str, int | None, int]] = []

    class Recorder(Reporter):
        def _ended(self, step):
            seen.append((step.name, step.total, step.completed))

    dataset.make(tmp_path / "counted", eval_count=3, calibration_count=2, progress=Recorder())
    assert seen == [("making 3 eval images", 3, 3), ("making 2 calibration images", 2, 2)]
    dataset.make(tmp_path / "quiet", eval_count=1, calibration_count=1)  # QUIET by default
    assert capsys.readouterr() == ("", "") and QUIET.line is None

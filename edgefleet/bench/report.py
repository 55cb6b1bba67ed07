"""The one output format of every benchmark: a table on the terminal and JSON with its goals."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgefleet.progress import QUIET, Reporter


@dataclass
class Goal:
    name: str
    value: float
    target: float
    unit: str
    # "min": value must be at least target; "max": at most.
    direction: str = "min"

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.direction == "min" else self.value <= self.target


def emit(bench: str, quick: bool, rows: list[dict], goals: list[Goal], json_out: Path | None, *,
         progress: Reporter = QUIET) -> int:
    """Prints the bench's table and its goals (standard output), writes the JSON, and closes with the one
    summary line (`progress.summary`: goals met, what was written).

    Returns:
        0, the command's exit status (a missed goal is a finding, not a failure).
    """
    console = Console()
    table = Table(title=f"edgefleet bench {bench}" + (" (quick)" if quick else ""))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    console.print(table)
    goal_table = Table(title="goals")
    for column in ("goal", "value", "target", "met"):
        goal_table.add_column(column)
    for g in goals:
        sign = "≥" if g.direction == "min" else "≤"
        goal_table.add_row(g.name, f"{g.value:.3f} {g.unit}", f"{sign} {g.target} {g.unit}",
                           "[green]yes[/]" if g.met else "[red]no[/]")
    console.print(goal_table)
    if json_out is not None:
        document = {
            "bench": bench,
            "quick": quick,
            "at": time.time(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "rows": rows,
            "goals": [{**asdict(g), "met": g.met} for g in goals],
        }
        json_out.write_text(json.dumps(document, indent=1))
        console.print(f"wrote {json_out}")
    progress.summary(summary_line(bench, quick, goals, json_out))
    return 0


def summary_line(bench: str, quick: bool, goals: list[Goal], json_out: Path | None) -> str:
    """'bench ep (quick): 1 of 1 goals met; wrote ep.json': a bench's closing line, the goals missed named."""
    missed = [g.name for g in goals if not g.met]
    line = f"bench {bench}{' (quick)' if quick else ''}: {len(goals) - len(missed)} of {len(goals)} goals met"
    if missed:
        line += f" (missed: {'; '.join(missed)})"
    return line + (f"; wrote {json_out}" if json_out is not None else "")


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)

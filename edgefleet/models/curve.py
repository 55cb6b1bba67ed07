"""A cascade's curve (edgefleet.models.cascade.Choice) for a person: a table of representative thresholds,
a PNG of agreement against the share escalated and against mean model time, and the whole curve as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.table import Table

from edgefleet.models.cascade import Choice, Point

# Rows the table shows: the curve has one point per distinct metric value (300 on the full data set),
# so the table keeps one per tenth of the share escalated, plus the chosen one; the CSV keeps them all.
TABLE_STEPS = 10


def shown(choice: Choice) -> list[Point]:
    """The points the table shows: the first at or above each tenth of the share escalated, and the chosen."""
    picked = {choice.chosen}
    for step in range(TABLE_STEPS + 1):
        picked.add(next((p for p in choice.points if p.escalated >= step / TABLE_STEPS), choice.points[-1]))
    return sorted(picked, key=lambda p: p.threshold)


def table(choice: Choice, title: str) -> Table:
    """The curve at representative thresholds, the chosen one marked."""
    large = choice.large
    out = Table(title=title, caption=f"{len(choice.points)} thresholds in all; model time per image on 1 thread, "
                f"t_small + share × t_large, at batch 1 and at batch {large.batch}")
    for column in ("threshold", "escalated", f"agreement with {large.model}", "ms/img batch 1",
                   f"ms/img batch {large.batch}", f"× {large.model} (batch {large.batch})", ""):
        out.add_column(column, justify="right")
    for p in shown(choice):
        mark = "chosen" if p == choice.chosen else ""
        style = "bold green" if mark and p.agreement >= choice.gate else "bold red" if mark else None
        out.add_row(f"{p.threshold:.4g}", f"{p.escalated:.1%}", f"{p.agreement:.2%}", f"{p.ms_batch1:.2f}",
                    f"{p.ms_batched:.2f}", f"{p.ms_batched / large.batched_ms:.2f}", mark, style=style)
    return out


def write_csv(choice: Choice, out: Path) -> None:
    """Every point of the curve, one row each."""
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["threshold", "escalated", "agreement", "ms_batch1", f"ms_batch{choice.large.batch}",
                         "chosen"])
        for p in choice.points:
            writer.writerow([f"{p.threshold:.6g}", f"{p.escalated:.4f}", f"{p.agreement:.4f}", f"{p.ms_batch1:.4f}",
                             f"{p.ms_batched:.4f}", int(p == choice.chosen)])


def save(choice: Choice, out: Path) -> None:
    """Agreement against share escalated (left) and against mean model time per image (right), with the
    gate and the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on devices or CI
    import matplotlib.pyplot as plt

    small, large, chosen = choice.small, choice.large, choice.chosen
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    agreement = [p.agreement for p in choice.points]
    left.plot([p.escalated for p in choice.points], agreement, color="tab:blue")
    left.scatter([chosen.escalated], [chosen.agreement], color="tab:red", zorder=3, label="chosen")
    left.set_xlabel(f"share escalated to {large.model}")
    left.set_ylabel(f"top-1 agreement with {large.model}")
    right.plot([p.ms_batch1 for p in choice.points], agreement, color="tab:blue", label="batch 1")
    right.plot([p.ms_batched for p in choice.points], agreement, color="tab:purple", label=f"batch {large.batch}")
    right.scatter([chosen.ms_batch1, chosen.ms_batched], [chosen.agreement] * 2, color="tab:red", zorder=3)
    for ms, basis in ((large.batch1_ms, "batch 1"), (large.batched_ms, f"batch {large.batch}")):
        right.axvline(ms, color="tab:gray", linestyle=":", linewidth=1)
        right.annotate(f"{large.model} alone, {basis}", (ms, 0.02), xycoords=("data", "axes fraction"),
                       rotation=90, fontsize=7, ha="right")
    right.set_xlabel("mean model time per image (ms): stage 1 + share × stage 2")
    for axes in (left, right):
        axes.axhline(choice.gate, color="tab:green", linestyle="--", linewidth=1, label=f"gate {choice.gate:g}")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
    figure.suptitle(f"cascade {small.model} → {large.model}: {choice.metric} threshold {chosen.threshold:.4g} "
                    f"({choice.samples} held-out images)", fontsize=10)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)

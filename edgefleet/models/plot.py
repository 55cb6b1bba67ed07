"""The evaluation's picture: agreement with the float teacher against latency, Pareto front marked.
A model is on the front when no other is both faster and at least as faithful."""

from __future__ import annotations

from pathlib import Path

from edgefleet.models.evaluate import Evaluation


def pareto_front(results: list[Evaluation]) -> list[Evaluation]:
    front = [
        r for r in results
        if not any(
            o is not r and o.p50_ms <= r.p50_ms and o.top1_agreement >= r.top1_agreement
            and (o.p50_ms < r.p50_ms or o.top1_agreement > r.top1_agreement)
            for o in results
        )
    ]
    return sorted(front, key=lambda r: r.p50_ms)


def save(results: list[Evaluation], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on devices or CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    front = pareto_front(results)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    axes.plot([r.p50_ms for r in front], [r.top1_agreement for r in front], "--", color="tab:green",
              label="Pareto front")
    for r in results:
        on_front = r in front
        axes.scatter(r.p50_ms, r.top1_agreement, s=60, color="tab:green" if on_front else "tab:gray", zorder=3)
        axes.annotate(f"{r.model}\n{r.size_mb:.1f} MB", (r.p50_ms, r.top1_agreement), textcoords="offset points",
                      xytext=(6, 6), fontsize=7)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.margins(x=0.35, y=0.08)  # room for the labels at both ends
    axes.set_xlabel("latency p50 at batch 1 (ms, log scale)")
    axes.set_ylabel("top-1 agreement with the float teacher")
    axes.set_title(f"agreement against latency ({results[0].samples} held-out images)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)

"""The report's figures, as data first (`Series`, testable without pixels) and then as PNG files.

Sweep figures: validation loss against tokens seen, against wall-clock seconds and against training
FLOPs (3 × the forward FLOPs per token × tokens: the compute-efficiency frontier), one line per variant:
the mean over its seeds with a band of ± one standard deviation. Seeds are aligned on the optimizer step
of each validation (the same recipe validates every seed at the same steps); only steps every seed
reached are drawn. Single-run figures: train/validation loss, learning rate, tokens/s, gradient norm and,
for routed FFNs, the per-layer expert-load imbalance (max/mean load), each against tokens seen.
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archifactory.report.runs import Run, Variant

X_AXES = {
    "tokens": ("tokens seen", "val_loss_vs_tokens.png"),
    "seconds": ("wall-clock seconds", "val_loss_vs_time.png"),
    "flops": ("training FLOPs", "val_loss_vs_flops.png"),
}


@dataclass
class Series:
    """One line of a figure: x, the mean of y over seeds, and the band (mean ± std; = mean for n=1)."""

    label: str
    x: list[float]
    y: list[float]
    low: list[float]
    high: list[float]
    n: int


def _x_value(run: Run, record: dict, axis: str) -> float | None:
    if axis == "tokens":
        return record.get("tokens_seen")
    if axis == "seconds":
        return record.get("elapsed_seconds")
    flops = run.number("flops_per_token")
    tokens = record.get("tokens_seen")
    return None if flops is None or tokens is None else 3.0 * flops * tokens


def run_points(run: Run, axis: str, metric: str = "val_loss") -> dict[int, tuple[float, float]]:
    """step -> (x, y) for every validation record of one run."""
    points = {}
    for record in run.metrics:
        y, x = record.get(metric), _x_value(run, record, axis)
        if y is not None and x is not None and "step" in record:
            points[int(record["step"])] = (float(x), float(y))
    return points


def variant_series(variant: Variant, axis: str, metric: str = "val_loss") -> Series | None:
    """The mean line and band of one variant over its completed seeds (None when nothing to draw)."""
    per_run = [p for p in (run_points(run, axis, metric) for run in variant.completed) if p]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    xs, ys, lows, highs = [], [], [], []
    for step in steps:
        x_values = [p[step][0] for p in per_run]
        y_values = [p[step][1] for p in per_run]
        mean = statistics.fmean(y_values)
        spread = statistics.stdev(y_values) if len(y_values) > 1 else 0.0
        xs.append(statistics.fmean(x_values))  # tokens and FLOPs agree across seeds; seconds differ a little
        ys.append(mean)
        lows.append(mean - spread)
        highs.append(mean + spread)
    return Series(variant.label, xs, ys, lows, highs, len(per_run))


def sweep_series(variants: list[Variant], axis: str, metric: str = "val_loss") -> list[Series]:
    """One series per variant that has validation records with this x axis."""
    return [s for s in (variant_series(v, axis, metric) for v in variants) if s is not None]


def run_panels(run: Run) -> dict[str, list[Series]]:
    """A single run's figures: panel title -> lines (x = tokens seen)."""

    def line(key: str, label: str | None = None) -> Series | None:
        points = [
            (r["tokens_seen"], r[key]) for r in run.metrics if r.get(key) is not None and "tokens_seen" in r
        ]
        if not points:
            return None
        x, y = [float(p[0]) for p in points], [float(p[1]) for p in points]
        return Series(label or key, x, y, y, y, 1)

    panels = {
        "loss (nats/token)": [line("train_loss", "train loss"), line("val_loss", "validation loss")],
        "learning rate": [line("lr", "lr")],
        "tokens/s": [line("tokens_per_second", "tokens/s")],
        "gradient norm": [line("grad_norm", "grad norm (before clipping)")],
    }
    imbalance_keys = sorted(
        {k for r in run.metrics for k in r if k.startswith("layers.") and k.endswith(".imbalance")},
        key=lambda k: int(k.split(".")[1]),
    )
    if imbalance_keys:
        panels["expert load imbalance (max/mean)"] = [
            line(k, k.split(".imbalance")[0]) for k in imbalance_keys
        ]
    return {title: [s for s in lines if s is not None] for title, lines in panels.items() if any(lines)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


LEGEND_WRAP = 48  # characters per legend line: a long variant label wraps instead of leaving the figure
LEGEND_COLUMNS = 3


def legend_below(figure: Any, ax: Any, fontsize: float = 8) -> Any:
    """The axes' legend below the panels (constrained layout makes room), labels wrapped, in columns."""
    handles, labels = ax.get_legend_handles_labels()
    wrapped = [textwrap.fill(label, LEGEND_WRAP) for label in labels]
    columns = min(LEGEND_COLUMNS, len(wrapped))
    return figure.legend(
        handles, wrapped, loc="outside lower center", ncol=columns, fontsize=fontsize, frameon=False
    )


def _legend_lines(series: list[Series]) -> int:
    """Text lines the legend below takes: the tallest wrapped label per row of columns."""
    heights = [len(textwrap.wrap(f"{s.label} (n={s.n})", LEGEND_WRAP)) or 1 for s in series]
    rows = [heights[i : i + LEGEND_COLUMNS] for i in range(0, len(heights), LEGEND_COLUMNS)]
    return sum(max(row) for row in rows)


def draw_sweep(series: list[Series], axis: str, path: Path, title: str) -> Path:
    figure = sweep_figure(series, axis, title)
    figure.savefig(path)
    _pyplot().close(figure)
    return path


def sweep_figure(series: list[Series], axis: str, title: str) -> Any:
    """Two panels: the whole run, and the second half of it (where the variants separate); the legend
    below both, the figure as tall as it needs to hold it."""
    plt = _pyplot()
    height = 4.3 + 0.16 * _legend_lines(series)
    figure, axes = plt.subplots(1, 2, figsize=(11, height), dpi=120, layout="constrained")
    for ax, tail in zip(axes, (False, True)):
        for s in series:
            start = _tail_start(s.x) if tail else 0
            x, y, low, high = s.x[start:], s.y[start:], s.low[start:], s.high[start:]
            (handle,) = ax.plot(x, y, "o-", markersize=3, linewidth=1.6, label=f"{s.label} (n={s.n})")
            if s.n > 1:
                ax.fill_between(x, low, high, color=handle.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(X_AXES[axis][0])
        if axis == "flops" and not tail:
            ax.set_xscale("log")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("second half (zoom)" if tail else title, fontsize=10)
        ax.grid(alpha=0.3)
    legend_below(figure, axes[0])
    return figure


def _tail_start(x: list[float]) -> int:
    """Index of the first point in the second half of the x range."""
    if not x:
        return 0
    middle = x[0] + (x[-1] - x[0]) / 2
    return next((i for i, v in enumerate(x) if v >= middle), 0)


def draw_run(panels: dict[str, list[Series]], path: Path, title: str) -> Path:
    plt = _pyplot()
    count = max(1, len(panels))
    columns = 2 if count > 1 else 1
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.3 * rows), dpi=110, squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        for s in lines:
            ax.plot(s.x, s.y, "o-" if len(s.x) < 30 else "-", markersize=3, linewidth=1.2, label=s.label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        if len(lines) > 1:  # many layers' imbalance lines: columns of 8 keep the legend in its panel
            ax.legend(fontsize=7, ncol=(len(lines) + 7) // 8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path

"""`curves.png` in the run directory: train and validation loss against tokens seen, and next to it the
validation accuracy when the run measures one (a synthetic probe's answer accuracy, SFT's accuracy on
assistant tokens) — for a probe, accuracy is the score that matters, the loss only its proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archifactory.runs import layout
from archifactory.runs.records import read_metrics


def _points(lines: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(m["tokens_seen"], m[key]) for m in lines if m.get(key) is not None and "tokens_seen" in m]


def curves_figure(lines: list[dict[str, Any]], title: str) -> Any:
    """The figure of metrics.jsonl's records: a loss panel, plus an accuracy panel when `val_accuracy` was
    logged; None when nothing is logged."""
    train, val, accuracy = (_points(lines, key) for key in ("train_loss", "val_loss", "val_accuracy"))
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = 2 if accuracy else 1
    figure, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.2), dpi=120, squeeze=False)
    loss_axis = axes[0][0]
    if train:
        loss_axis.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        loss_axis.plot(*zip(*val), "o-", label="validation loss", linewidth=1.6, markersize=3)
    loss_axis.set_ylabel("cross-entropy (nats/token)")
    loss_axis.legend()
    if accuracy:
        accuracy_axis = axes[0][1]
        accuracy_axis.plot(
            *zip(*accuracy), "o-", color="tab:green", label="validation accuracy", markersize=3
        )
        accuracy_axis.set_ylabel("validation accuracy (answer tokens)")
        accuracy_axis.set_ylim(-0.02, 1.02)
        accuracy_axis.legend()
    for axis in axes[0]:
        axis.set_xlabel("tokens seen")
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_loss_curves(run_dir: Path, title: str) -> Path | None:
    """Draw metrics.jsonl's curves to `curves.png`; returns the image path (None when nothing is logged)."""
    figure = curves_figure(read_metrics(layout.metrics_path(run_dir)), title)  # a torn line is dropped
    if figure is None:
        return None
    import matplotlib.pyplot as plt

    path = run_dir / layout.CURVES
    figure.savefig(path)
    plt.close(figure)
    return path

"""`curves.png` in the run directory: train and validation loss against tokens seen."""

from __future__ import annotations

from pathlib import Path

from archifactory.runs.records import read_metrics


def plot_loss_curves(run_dir: Path, title: str) -> Path | None:
    """Draw metrics.jsonl's train_loss and val_loss; returns the image path (None when nothing is logged)."""
    lines = read_metrics(run_dir / "metrics.jsonl")  # a torn line is dropped, not fatal
    train = [(m["tokens_seen"], m["train_loss"]) for m in lines if m.get("train_loss") is not None]
    val = [(m["tokens_seen"], m["val_loss"]) for m in lines if m.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        axis.plot(*zip(*val), "o-", label="validation loss", linewidth=1.6, markersize=3)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = run_dir / "curves.png"
    figure.savefig(path)
    plt.close(figure)
    return path

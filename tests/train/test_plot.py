"""`curves.png`: the loss panel for every run, and the validation accuracy beside it for a probe."""

from __future__ import annotations

import json
from pathlib import Path

from archifactory.train.plot import curves_figure, plot_loss_curves


def records(accuracy: bool) -> list[dict]:
    lines = []
    for step in (10, 20, 30):
        lines.append({"step": step, "tokens_seen": step * 64, "train_loss": 3.0 - step / 20})
        val = {"step": step, "tokens_seen": step * 64, "val_loss": 2.9 - step / 20}
        lines.append(val | ({"val_accuracy": step / 40} if accuracy else {}))
    return lines


def test_a_probe_run_shows_its_accuracy_beside_the_loss(tmp_path: Path) -> None:
    figure = curves_figure(records(accuracy=True), "mqar")
    loss, accuracy = figure.axes
    assert [line.get_label() for line in loss.get_lines()] == ["train loss", "validation loss"]
    (curve,) = accuracy.get_lines()
    assert curve.get_label() == "validation accuracy"
    assert list(curve.get_xdata()) == [640, 1280, 1920] and list(curve.get_ydata()) == [0.25, 0.5, 0.75]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(True)))
    assert plot_loss_curves(tmp_path, "mqar").read_bytes()[:4] == b"\x89PNG"


def test_a_text_run_has_the_loss_panel_only_and_nothing_logged_draws_nothing(tmp_path: Path) -> None:
    (only,) = curves_figure(records(accuracy=False), "text").axes
    assert len(only.get_lines()) == 2
    assert curves_figure([], "empty") is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_loss_curves(tmp_path, "empty") is None and not (tmp_path / "curves.png").exists()

"""`archifactory export`: a run's checkpoint in Hugging Face format (`archifactory.hf`), and the `model/`
folder every finished training run writes."""

from __future__ import annotations

import logging
from pathlib import Path

from archifactory.hf.model import config_from_run, save_pretrained
from archifactory.runs import layout
from archifactory.runs.load import load_run

log = logging.getLogger(__name__)


def export_run(run_dir: Path | str, out: Path | str | None = None, step: int | None = None) -> Path:
    """Write a run's checkpoint (newest, or at `step`) in Hugging Face format (default `<run_dir>/model/`)."""
    loaded = load_run(run_dir, step=step)
    config = config_from_run(loaded.config, loaded.tokenizer.vocab_size)
    return save_pretrained(loaded.model, config, loaded.tokenizer, out or Path(run_dir) / layout.MODEL)


def write_model_folder(run_dir: Path | str) -> Path | None:
    """End of training: `<run_dir>/model/` from the final checkpoint; None (skipped) for a run without a
    tokenizer (synthetic probes have no text to write a tokenizer for)."""
    if not (Path(run_dir) / layout.TOKENIZER).is_dir():
        log.info("no tokenizer in %s (synthetic data): no model/ folder written", run_dir)
        return None
    return export_run(run_dir)

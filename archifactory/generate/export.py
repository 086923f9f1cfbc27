"""`archifactory export`: a run's checkpoint in Hugging Face format (`archifactory.hf`), and the `model/`
folder every finished training run writes.

Formats: `hf` (ours: `ArchiFactoryForCausalLM`, any architecture, the default) and `deepseek_v3` (a native
transformers `DeepseekV3ForCausalLM` of an all-mla run, `hf/deepseek.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout
from archifactory.runs.load import load_run, load_run_config

log = logging.getLogger(__name__)


EXPORT_FORMATS = ("hf", "deepseek_v3")


def check_format(export_format: str) -> None:
    """One line for a `format=` that is not an export format (the verb checks it before finding the run)."""
    if export_format not in EXPORT_FORMATS:
        raise ArchiFactoryError(
            f"format={export_format!r} is not an export format; use format=hf (ArchiFactory's own, the "
            "default, any architecture) or format=deepseek_v3 (a transformers DeepSeek-V3 of an all-mla run)"
        )


def export_run(
    run_dir: Path | str, out: Path | str | None = None, step: int | None = None, export_format: str = "hf"
) -> Path:
    """Write a run's checkpoint (newest, or at `step`) in Hugging Face format: `hf` (default folder
    `<run_dir>/model/`) or `deepseek_v3` (default `<run_dir>/model_deepseek_v3/`)."""
    # transformers (~3 s of imports) is loaded here, when a folder is written, not when `archifactory train`
    # starts: a run's start, its other ranks and its early failures never pay for it
    from archifactory.hf.deepseek import check_exportable, save_deepseek_v3
    from archifactory.hf.model import config_from_run, save_pretrained

    check_format(export_format)
    if export_format == "deepseek_v3":
        check_exportable(load_run_config(Path(run_dir)))  # before loading any weights
    loaded = load_run(run_dir, step=step)
    if loaded.tokenizer is None:
        raise ArchiFactoryError(f"{run_dir} has no tokenizer (synthetic data): there is no text to export")
    if export_format == "deepseek_v3":
        folder = out or Path(run_dir) / layout.MODEL_DEEPSEEK_V3
        return save_deepseek_v3(loaded.model, loaded.config, loaded.tokenizer, folder)
    config = config_from_run(loaded.config, loaded.tokenizer.vocab_size)
    return save_pretrained(loaded.model, config, loaded.tokenizer, out or Path(run_dir) / layout.MODEL)


def write_model_folder(run_dir: Path | str) -> Path | None:
    """End of training: `<run_dir>/model/` from the final checkpoint; None (skipped) for a run without a
    tokenizer (synthetic probes have no text to write a tokenizer for)."""
    if not (Path(run_dir) / layout.TOKENIZER).is_dir():
        log.info("no tokenizer in %s (synthetic data): no model/ folder written", run_dir)
        return None
    return export_run(run_dir)

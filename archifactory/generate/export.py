"""`archifactory export`: a run's checkpoint in Hugging Face format (`archifactory.hf`), and the `model/`
folder every finished training run writes.

Formats: `hf` (ours: `ArchiFactoryForCausalLM`, any architecture, the default) and `deepseek_v3` (a native
transformers `DeepseekV3ForCausalLM` of an all-mla run, `hf/deepseek.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout
from archifactory.runs.load import LoadedRun, load_run, load_run_config

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
    check_format(export_format)
    if export_format == "deepseek_v3":
        return _export_deepseek_v3(Path(run_dir), out, step)
    # transformers' configuration and tokenizer code (~1 s of imports) is loaded here, when a folder is
    # written, not when `archifactory train` starts: a run's start, its other ranks and its early failures
    # never pay for it
    from archifactory.hf.write import config_from_run, save_pretrained

    loaded = _load_with_tokenizer(Path(run_dir), step)
    config = config_from_run(loaded.config, loaded.tokenizer.vocab_size)
    return save_pretrained(loaded.model, config, loaded.tokenizer, out or Path(run_dir) / layout.MODEL)


def _export_deepseek_v3(run_dir: Path, out: Path | str | None, step: int | None) -> Path:
    """`format=deepseek_v3`: refused in one line before any weight is loaded when DeepSeek-V3 cannot express
    the run. Its transformers import (the DeepSeek-V3 config pulls in transformers' modeling code, ~3 s) is
    paid by this export alone, never by the `model/` folder of a finished run."""
    from archifactory.hf.deepseek import check_exportable, save_deepseek_v3

    check_exportable(load_run_config(run_dir))
    loaded = _load_with_tokenizer(run_dir, step)
    folder = out or run_dir / layout.MODEL_DEEPSEEK_V3
    return save_deepseek_v3(loaded.model, loaded.config, loaded.tokenizer, folder)


def _load_with_tokenizer(run_dir: Path, step: int | None) -> LoadedRun:
    """The run's checkpoint (newest, or at `step`), refused in one line when the run has no tokenizer."""
    loaded = load_run(run_dir, step=step)
    if loaded.tokenizer is None:
        raise ArchiFactoryError(f"{run_dir} has no tokenizer (synthetic data): there is no text to export")
    return loaded


def write_model_folder(run_dir: Path | str) -> Path | None:
    """End of training: `<run_dir>/model/` from the final checkpoint; None (skipped) for a run without a
    tokenizer (synthetic probes have no text to write a tokenizer for)."""
    if not (Path(run_dir) / layout.TOKENIZER).is_dir():
        log.info("no tokenizer in %s (synthetic data): no model/ folder written", run_dir)
        return None
    return export_run(run_dir)

"""Sweeps that survive a failed job: Hydra multirun (`archifactory train -m …`) records the failure in the
job's run directory and moves on to the next job; the command exits non-zero at the end, naming them.

Every job of a sweep with the same `seed` reads the same tokens in the same order (the loader's order is
a function of the dataset and the seed only) and starts from the same RNG state, so variants differ only
in what the sweep varies. A job that fails before training starts (a shape that cannot be matched, a
bad option) still leaves a `summary.json` with `status: failed` and the error, so `archifactory report`
shows it as failed rather than missing.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout
from archifactory.runs.files import write_atomic
from archifactory.runs.records import update_summary

log = logging.getLogger(__name__)

# (job label, error) of the jobs of this process's sweep that failed (basic launcher: all in-process)
FAILED_JOBS: list[tuple[str, str]] = []


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(cfg: DictConfig, error: BaseException, write_record: bool = True) -> None:
    """Note a failed sweep job (in-process launchers): its run dir's summary.json says `failed` and the
    sweep goes on. `write_record=False` (verbs whose job dir is not a training run) only notes it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    message = str(error) or type(error).__name__
    overrides = list(hydra_cfg.overrides.task)
    FAILED_JOBS.append((f"#{hydra_cfg.job.num} {' '.join(overrides)}", message))
    log.error("sweep job %s failed: %s", hydra_cfg.job.num, message)
    if write_record:
        run_dir = Path(hydra_cfg.runtime.output_dir)
        write_failed_record(run_dir, cfg, overrides, message)
        if not isinstance(error, ArchiFactoryError):  # a bug, not a user error: keep its traceback
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            write_atomic(run_dir / layout.TRACEBACK, trace)


def write_failed_record(run_dir: Path, cfg: DictConfig, overrides: list[str], message: str) -> None:
    """summary.json with `status: failed` and the error when the run stopped before it wrote one (a
    completed or already-failed run's summary is never touched), and the overrides the report reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not layout.summary_path(run_dir).exists():
        summary: dict[str, Any] = {"status": "failed", "error": message, "run_dir": str(run_dir)}
        for key in ("mixin", "ffn", "positional", "dataset"):
            summary[key] = OmegaConf.select(cfg, f"{key}.name", default=None)
        summary["seed"] = OmegaConf.select(cfg, "seed", default=None)
        update_summary(run_dir, summary)
    overrides_file = layout.overrides_path(run_dir)
    if not overrides_file.exists():  # the report labels variants by their overrides
        write_atomic(overrides_file, OmegaConf.to_yaml(OmegaConf.create(overrides)))


def failure_report() -> int:
    """After a sweep: one line per failed job on stderr; the exit status (1 when any failed)."""
    import sys

    if not FAILED_JOBS:
        return 0
    print(f"error: {len(FAILED_JOBS)} sweep job(s) failed (recorded in their run dirs):", file=sys.stderr)
    for label, message in FAILED_JOBS:
        print(f"  {label}: {json.dumps(message)[1:-1]}", file=sys.stderr)
    return 1

"""Deciding what a `train` command may do with its run directory, before it writes a byte there.

`plan_run` reads the directory (defensively) and returns a `RunPlan`: start fresh, continue from a
verified checkpoint, or do nothing because the run is already complete. It refuses, with one line and
nothing written, a fresh run over a run that holds checkpoints or completed, a resume whose config
differs from the saved one in anything but the settings that are safe to change, and a corrupt or
incomplete checkpoint. `claim_run` then writes `.hydra/` (atomically) and attaches the run's log.

**What resume compares.** The saved resolved `.hydra/config.yaml` against the new config, key by key.
Everything must match — architecture, data, tokenizer, batch and optimizer recipe — except
`SAFE_TO_CHANGE`: the step/token budget, the log/eval/checkpoint cadence, checkpoint retention, where and
how it runs (device, strategy, precision, compile, activation checkpointing, threads), wandb, and the
cache location and checks. The refusal names every differing key with both values; the changed safe
keys are logged when the run continues.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout
from archifactory.runs.checkpoints import finished_checkpoints
from archifactory.runs.files import remove_stale_writes, write_atomic
from archifactory.runs.log import attach_log_file
from archifactory.runs.records import read_summary, rebuild_summary, replace_summary
from archifactory.train.checkpoint import remove_temporaries, verify_checkpoint

log = logging.getLogger(__name__)

DAMAGED_SUMMARY = "%s: %s was damaged; rebuilt it from the metrics and the last checkpoint"

SAFE_TO_CHANGE = (
    "run_name",
    "experiment_name",
    "trainer.preset",  # a name only: the fields it sets are compared one by one
    "model.preset",
    "trainer.resume",
    "trainer.max_steps",
    "trainer.total_tokens",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.checkpoint_format",  # each checkpoint says its own format; a resume reads either
    "trainer.async_checkpoint",
    "trainer.max_nonfinite_steps",
    "trainer.device",
    "trainer.strategy",
    "trainer.precision",
    "trainer.compile",
    "trainer.activation_checkpointing",
    "trainer.num_threads",
    "dataset.cache_dir",
    "dataset.verify_cache",
    "dataset.rebuild",
    "dataset.token_env",
    "wandb.",
)


def is_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's `.hydra/config.yaml`, resolved; None when it is missing or unreadable."""
    path = layout.config_path(run_dir)
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # a damaged YAML: the run is still resumable, only uncompared
        log.warning("%s is unreadable (%s); the resume cannot compare configs", path, error)
        return None
    try:
        values = OmegaConf.to_container(saved, resolve=True)
    except Exception:  # an interpolation that no longer resolves: compare the raw text instead
        values = OmegaConf.to_container(saved, resolve=False)
    return values if isinstance(values, dict) else None


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that forbid a resume, changes that are safe), each as "key: old -> new"."""
    old_flat, new_flat = flatten(saved), flatten(new)
    unsafe, safe = [], []
    for key in sorted(old_flat.keys() & new_flat.keys()):
        old, value = old_flat[key], new_flat[key]
        if old == value:
            continue
        (safe if is_safe(key) else unsafe).append(f"{key}: {old!r} -> {value!r}")
    added = sorted(new_flat.keys() - old_flat.keys())
    if added:  # keys this version knows and the saved config's version did not
        log.info("not in the saved config (an older version wrote it): %s", ", ".join(added))
    return unsafe, safe


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The summary keys a config names: mixin, ffn, positional, dataset, seed."""
    names = {key: (config.get(key) or {}).get("name") for key in ("mixin", "ffn", "positional", "dataset")}
    return names | {"seed": config.get("seed")}


@dataclass
class RunPlan:
    """What `train` does with the run directory."""

    resume_from: Path | None = None  # a verified checkpoint to continue from
    previous_summary: dict[str, Any] | None = None  # carried into the resumed run's summary.json
    completed: dict[str, Any] | None = None  # set: nothing to do, this is the finished run's summary
    safe_changes: list[str] = field(default_factory=list)
    rebuilt_summary: bool = False  # the previous summary.json was damaged and rebuilt

    @property
    def resume_step(self) -> int | None:
        return None if self.resume_from is None else int(self.resume_from.name.split("_")[-1])


def plan_run(cfg: DictConfig, run_dir: Path, planned_steps: int) -> RunPlan:
    """Read-only: decide fresh / resume / nothing to do, or refuse with one line (see the module doc)."""
    checkpoints = finished_checkpoints(run_dir)
    summary = read_summary(run_dir)
    status = summary.get("status") if summary else None
    if not cfg.trainer.resume:
        if checkpoints or status == "completed":
            raise ArchiFactoryError(
                f"{run_dir} already holds a run (status {status or 'unknown'}); continue it with "
                "trainer.resume=true or start another with run_name=<new name>"
            )
        return RunPlan()
    plan = RunPlan()
    saved = saved_config(run_dir)
    if saved is not None and (checkpoints or summary):
        new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        unsafe, plan.safe_changes = config_changes(saved, new)  # type: ignore[arg-type]
        if unsafe:
            raise ArchiFactoryError(
                f"cannot resume {run_dir}: its config differs in {'; '.join(unsafe)} (another architecture, "
                f"data or recipe). Resume with the config in {layout.config_path(run_dir)}, or start "
                "another run with run_name=<new name>"
            )
    elif checkpoints:
        log.warning(
            "%s has no readable %s: resuming without comparing configs", run_dir, layout.config_path("")
        )
    if not checkpoints:
        if status == "completed":
            done = summary.get("steps") or 0  # type: ignore[union-attr]
            if planned_steps <= done:
                plan.completed = summary
                return plan
            raise ArchiFactoryError(
                f"{run_dir} is a completed run of {done} steps with no checkpoint left to continue from; "
                "start another with run_name=<new name>"
            )
        log.warning("trainer.resume=true but %s holds no checkpoint: starting from step 0", run_dir)
        return plan
    meta = verify_checkpoint(checkpoints[-1])
    if summary is None:
        summary = rebuild_summary(run_dir, {"status": None, **identity(saved or {})}, meta)
        plan.rebuilt_summary = True
    finished = status == "completed" or (plan.rebuilt_summary and meta["step"] >= planned_steps)
    if finished and planned_steps <= meta["step"]:
        plan.completed = summary | ({"status": "completed"} if plan.rebuilt_summary else {})
        return plan
    plan.resume_from, plan.previous_summary = checkpoints[-1], summary
    return plan


def finish_completed(run_dir: Path, plan: RunPlan, is_main: bool) -> dict[str, Any]:
    """The no-op of resuming a finished run: say so, touch nothing (but rebuild a damaged summary)."""
    summary = plan.completed or {}
    if is_main:
        if plan.rebuilt_summary:
            replace_summary(run_dir, summary)
            log.warning(DAMAGED_SUMMARY, run_dir, layout.SUMMARY)
        log.info(
            "%s is already completed (%s steps): nothing to do; raise trainer.max_steps to continue it",
            run_dir,
            summary.get("steps"),
        )
    return summary


def claim_run(cfg: DictConfig, run_dir: Path, overrides: list[str], plan: RunPlan) -> None:
    """Rank 0, after `plan_run` accepted the directory: write `.hydra/`, attach the log, say what changed."""
    write_atomic(layout.config_path(run_dir), OmegaConf.to_yaml(cfg))
    write_atomic(layout.overrides_path(run_dir), OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    attach_log_file(layout.log_path(run_dir))
    remove_temporaries(layout.checkpoints_dir(run_dir))  # a killed save's leftovers hold disk space
    for folder in (run_dir, layout.config_path(run_dir).parent):
        remove_stale_writes(folder)
    if plan.resume_from is not None:
        log.info("resuming %s from %s (pid %d)", run_dir, plan.resume_from.name, os.getpid())
    if plan.safe_changes:
        log.info("resume: changed settings (safe to change): %s", "; ".join(plan.safe_changes))
    if plan.rebuilt_summary:
        log.warning(DAMAGED_SUMMARY, run_dir, layout.SUMMARY)

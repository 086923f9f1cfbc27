"""`archifactory train [overrides…]`: train one model (or a sweep with -m) into a run directory."""

from __future__ import annotations

from omegaconf import DictConfig

from archifactory.cli.hydra_app import job_overrides, job_run_dir, run_hydra
from archifactory.core.errors import ArchiFactoryError
from archifactory.train.loop import train


def train_task(cfg: DictConfig) -> None:
    if cfg.get("init_from"):
        raise ArchiFactoryError(
            "init_from is for `archifactory sft init_from=<run> dataset=…`, not for train"
        )
    train(cfg, job_run_dir(), job_overrides())


def train_main(args: list[str]) -> int:
    return run_hydra(train_task, "train", args)

"""`archifactory grpo init_from=<run> dataset=<task> [overrides…]`: the same Hydra app as `train`, over
`archifactory.grpo` (what GRPO takes from the init run is documented in `grpo/run.py`)."""

from __future__ import annotations

from omegaconf import DictConfig

from archifactory.cli.hydra_app import job_overrides, job_run_dir, run_hydra
from archifactory.grpo.loop import grpo
from archifactory.grpo.run import grpo_arguments, with_init_architecture
from archifactory.runs.load import load_run_config


def grpo_main(args: list[str]) -> int:
    init, hydra_args = grpo_arguments(args)

    def task(cfg: DictConfig) -> None:
        grpo(with_init_architecture(cfg, load_run_config(init)), init, job_run_dir(), job_overrides())

    return run_hydra(task, "grpo", hydra_args)

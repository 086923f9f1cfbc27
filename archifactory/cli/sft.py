"""`archifactory sft init_from=<pretrained run> dataset=chat_jsonl|limo|dolphin_r1 [overrides…]`: the
same Hydra app as `train`, over `archifactory.sft.run` (what SFT changes is documented there)."""

from __future__ import annotations

from omegaconf import DictConfig

from archifactory.cli.hydra_app import job_overrides, job_run_dir, run_hydra
from archifactory.sft.run import sft, sft_arguments


def sft_main(args: list[str]) -> int:
    pretrained, hydra_args = sft_arguments(args)

    def task(cfg: DictConfig) -> None:
        sft(cfg, pretrained, job_run_dir(), job_overrides())

    return run_hydra(task, "sft", hydra_args)

"""`archifactory data prepare dataset=… [dataset.key=value …]`: tokenize and pack a dataset into cached shards."""

from __future__ import annotations

from omegaconf import DictConfig

from archifactory.cli.hydra_app import job_run_dir, run_hydra
from archifactory.config.validation import validate_config
from archifactory.core.errors import ArchiFactoryError
from archifactory.data import prepare_task as prepare
from archifactory.runs.log import LOG_NAME, attach_log_file


def prepare_task(cfg: DictConfig) -> None:
    validate_config(cfg)
    # the cache's logs folder is not a run: its log is attached at once
    attach_log_file(job_run_dir() / LOG_NAME)
    prepare(cfg)


# a synthetic probe (dataset=mqar|mad) has no cache_dir: its no-op log goes to the default cache root
LOG_DIR = "hydra.run.dir='${oc.select:dataset.cache_dir,${oc.env:ARCHIFACTORY_CACHE,${oc.env:HOME}/.cache/archifactory}}/logs'"  # noqa: E501


def data_main(args: list[str]) -> int:
    if not args or args[0] != "prepare":
        raise ArchiFactoryError("usage: archifactory data prepare dataset=<name> [dataset.key=value ...]")
    # preparing data is not a run: its log goes to the cache, not to an outputs/<run_name>/ directory
    return run_hydra(prepare_task, "data prepare", [LOG_DIR, *args[1:]])

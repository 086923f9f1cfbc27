"""The Hydra app every job verb (`train`, `sft`, `data prepare`) runs: overrides, `-m` multirun, `--cfg job`,
`--help` and `hydra/launcher=…` behave as Hydra users expect, and every failure is one `error:` line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from archifactory.cli import guard
from archifactory.cli.sweep import FAILED_JOBS, failure_report, is_multirun, record_failed_job
from archifactory.config.compose import GROUPS, config_dir, group_options
from archifactory.config.schema import register_configs
from archifactory.config.validation import check_known_keys
from archifactory.core.errors import ArchiFactoryError
from archifactory.runs.layout import SUMMARY
from archifactory.runs.log import detach_log_file
from archifactory.runs.records import read_summary


def group_choices(override) -> list[str]:
    """The option names a parsed group override asks for: one, a sweep's list (`a,b`, `choice(a,b)`), or
    the options a `glob(...)` matches (one line naming the glob when it matches none)."""
    from hydra.core.override_parser.types import ChoiceSweep, Glob

    group, value = override.key_or_group, override.value()
    if isinstance(value, Glob):
        matched = value.filter(list(group_options(group)))
        if not matched:
            raise ArchiFactoryError(
                f"{override.input_line} matches no {group}; choose among: {', '.join(group_options(group))}"
            )
        return matched
    values = value.list if isinstance(value, ChoiceSweep) else [value]
    # interpolations and other sweep kinds (range, interval) are left to Hydra
    return [v for v in values if isinstance(v, str) and not v.startswith("${")]


def check_group_choices(args: list[str]) -> list[str]:
    """Refuse `group=unknown` before Hydra, with one line naming the valid choices; return the arguments
    for Hydra with every group `glob(…)` replaced by the options it matches.

    Arguments are read with Hydra's own override parser, so sweep syntax (`a,b`, `choice(…)`, `glob(…)`,
    `range(…)`) reaches Hydra intact; what the parser rejects is left to Hydra's own message. Globs are
    expanded here because Hydra would match them against the ConfigStore too, whose `_schema_*` entries
    share each group with the YAML options and are not runnable choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    checked: list[str] = []
    for arg in args:
        checked.append(arg)
        if arg.startswith("-") or "=" not in arg:
            continue  # flags (-m, --cfg job, …) and their values
        try:
            override = parser.parse_overrides([arg])[0]
        except HydraException:
            continue
        group = override.key_or_group
        if group not in GROUPS or override.is_delete() or override.value() is None:
            continue
        options = group_options(group)
        choices = group_choices(override)
        for choice in choices:
            if choice not in options:
                raise ArchiFactoryError(
                    f"unknown {group} {choice!r}; choose one of: {', '.join(options)} (see `archifactory list`)"
                )
        if isinstance(override.value(), Glob):
            checked[-1] = f"{override.get_key_element()}={','.join(choices)}"
    return checked


def run_hydra(task: Callable, verb: str, args: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    args = check_group_choices(args)
    register_configs()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def app(cfg: DictConfig) -> None:
        try:  # a `+key` no schema has fails here as a typo does at compose: the whole command stops
            check_known_keys(cfg)
        except ArchiFactoryError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        # Hydra would print a traceback for an exception; every failure is one line and exit 1 instead.
        try:
            task(cfg)
            if verb in RUN_VERBS:  # the last stdout line, whatever the logs did: where and how it ended
                print(run_closing_line(job_run_dir()))
        except Exception as error:
            if is_multirun():  # a failed sweep job is recorded; the sweep goes on (archifactory/sweep.py)
                print(f"error: {error}", file=sys.stderr)
                record_failed_job(cfg, error, write_record=verb == "train")
                return
            if isinstance(error, ArchiFactoryError):
                print(f"error: {error}", file=sys.stderr)
                sys.exit(1)
            if guard.debug_enabled():
                raise
            print(guard.unexpected_error_line(error), file=sys.stderr)
            sys.exit(1)
        finally:
            detach_log_file()

    sys.argv = [f"archifactory {verb}", *args]
    # Hydra's own report of a compose error is several lines; with HYDRA_FULL_ERROR it raises instead,
    # and `main` folds the message onto one line.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    FAILED_JOBS.clear()
    try:
        app()
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return failure_report()


RUN_VERBS = ("train", "sft", "grpo")  # the Hydra verbs whose job directory is a training run


def run_closing_line(run_dir: Path) -> str:
    """`done: <run dir>: completed, 300 steps, val_loss 3.2101, 412.5s`, from the run's summary.json."""
    summary = read_summary(run_dir) or {}
    val_loss, wall = summary.get("val_loss"), summary.get("wall_seconds")
    return (
        f"done: {run_dir}: {summary.get('status', 'no ' + SUMMARY)}, {summary.get('steps') or 0} steps, "
        f"val_loss {'n/a' if val_loss is None else f'{val_loss:.4f}'}, "
        f"{'n/a' if wall is None else f'{wall:.1f}s'}"
    )


def job_run_dir() -> Path:
    """The running Hydra job's output directory (the run directory)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def job_overrides() -> list[str]:
    """The running Hydra job's command-line overrides (saved as `.hydra/overrides.yaml`)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)

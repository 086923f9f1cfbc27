"""`archifactory <verb> [hydra overrides…]`: pops the verb and hands the rest to Hydra.

Verbs that run a job (`train`, and later ones) are Hydra apps over the same `configs/`, so overrides,
`-m` multirun, `--cfg job`, `--help` and `hydra/launcher=…` behave as Hydra users expect. `list` prints
every option of every config group. Every failure is one `error:` line on stderr and a non-zero exit
(`archifactory.guard`): a user error as is, a compose error folded onto one line, anything unexpected
with its type and the log file holding the traceback; `--debug` (or `ARCHIFACTORY_DEBUG=1`) re-raises.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from archifactory import generate_cli, guard
from archifactory.errors import ArchiFactoryError
from archifactory.sweep import FAILED_JOBS, failure_report, is_multirun, record_failed_job

GROUPS = ("mixin", "ffn", "positional", "dataset", "task", "mqar_cell", "trainer", "model", "experiment")
USAGE = """usage: archifactory [--debug] <verb> [key=value ...] [-m] [--cfg job] [--help]

verbs:
  train      train one model (or a sweep with -m) and write a run directory
  data       `data prepare dataset=…`: tokenize and pack a dataset into cached token shards
  eval       `eval <task>[,<task>…] [run=…]`: lm-eval tasks (mmlu, …) and perplexity/bits per byte of a run
  sft        `sft init_from=<run> dataset=chat_jsonl|limo|dolphin_r1`: instruction-tune a pretrained run
  generate   `generate [run=…] prompt="…"`: stream text from a trained run (prompt_file=… for JSONL)
  export     `export [run=…] [out=…] [step=…]`: write a checkpoint in Hugging Face format
  list       every option of every config group, with its description
             (`list --params model.target_params=30M`: the matched shape of every mixin x FFN)
  report     `report <sweep dir | run dir ...>`: results table (mean ± std over seeds) and plots

--debug (or ARCHIFACTORY_DEBUG=1): show the traceback of an unexpected error instead of one line

examples:
  archifactory train mixin=gqa ffn=swiglu
  archifactory train -m positional=rope,alibi seed=0,1
  archifactory train dataset=text dataset.path=./my_corpus model=tiny trainer=cpu
"""


def config_dir() -> Path:
    """The packaged configs (wheel install) or the repository's `configs/` (editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


def group_options(group: str) -> dict[str, str]:
    """Option name -> its one-line description (the first comment line of its YAML)."""
    options: dict[str, str] = {}
    for path in sorted((config_dir() / group).glob("*.yaml")):
        description = ""
        for line in path.read_text().splitlines():
            if line.startswith("#") and not line.startswith("# @package"):
                description = line.lstrip("# ").strip()
                break
        options[path.stem] = description
    return options


def list_options(args: list[str]) -> int:
    if args and args[0] == "--params":  # the matched shape of every mixin x FFN, nothing trained
        from archifactory.model.params_list import list_params

        return list_params(args[1:])
    if args:
        raise ArchiFactoryError(f"usage: archifactory list [--params key=value ...]; got {' '.join(args)}")
    for group in GROUPS:
        options = group_options(group)
        width = max(len(f"{group}={name}") for name in options)
        print(f"{group}:")
        for name, description in options.items():
            print(f"  {f'{group}={name}':<{width}}  {description}")
    return 0


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
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from archifactory.config import register_configs
    from archifactory.validation import check_known_keys

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
                print(run_closing_line(Path(HydraConfig.get().runtime.output_dir)))
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
            guard.detach_log_file()

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


RUN_VERBS = ("train", "sft")  # the Hydra verbs whose job directory is a training run


def run_closing_line(run_dir: Path) -> str:
    """`done: <run dir>: completed, 300 steps, val_loss 3.2101, 412.5s`, from the run's summary.json."""
    from archifactory.train.rundir import read_summary

    summary = read_summary(run_dir) or {}
    val_loss, wall = summary.get("val_loss"), summary.get("wall_seconds")
    return (
        f"done: {run_dir}: {summary.get('status', 'no summary.json')}, {summary.get('steps') or 0} steps, "
        f"val_loss {'n/a' if val_loss is None else f'{val_loss:.4f}'}, "
        f"{'n/a' if wall is None else f'{wall:.1f}s'}"
    )


def train_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from archifactory.train.loop import train

    if cfg.get("init_from"):
        raise ArchiFactoryError(
            "init_from is for `archifactory sft init_from=<run> dataset=…`, not for train"
        )
    hydra_cfg = HydraConfig.get()
    train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))


def prepare_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from archifactory.data import prepare_task as prepare
    from archifactory.validation import validate_config

    validate_config(cfg)
    # the cache's logs folder is not a run: its log is attached at once
    guard.attach_log_file(Path(HydraConfig.get().runtime.output_dir) / guard.LOG_NAME)
    prepare(cfg)


# a synthetic probe (dataset=mqar|mad) has no cache_dir: its no-op log goes to the default cache root
LOG_DIR = "hydra.run.dir='${oc.select:dataset.cache_dir,${oc.env:ARCHIFACTORY_CACHE,${oc.env:HOME}/.cache/archifactory}}/logs'"  # noqa: E501


def data_verb(args: list[str]) -> int:
    if not args or args[0] != "prepare":
        raise ArchiFactoryError("usage: archifactory data prepare dataset=<name> [dataset.key=value ...]")
    # preparing data is not a run: its log goes to the cache, not to an outputs/<run_name>/ directory
    return run_hydra(prepare_task, "data prepare", [LOG_DIR, *args[1:]])


def eval_verb(args: list[str]) -> int:
    from archifactory.eval.cli import eval_main  # lm-eval and the models load only for this verb

    return eval_main(args)


def sft_verb(args: list[str]) -> int:
    from archifactory.sft.cli import sft_main  # chat templates and pretrained loading only for this verb

    return sft_main(args)


def report_verb(args: list[str]) -> int:
    from archifactory.report import main as report_main

    return report_main(args)


VERBS: dict[str, Callable[[list[str]], int]] = {
    "train": lambda args: run_hydra(train_task, "train", args),
    "data": data_verb,
    "list": list_options,
    "eval": eval_verb,
    "sft": sft_verb,
    "generate": lambda args: generate_cli.generate_verb(args),
    "export": lambda args: generate_cli.export_verb(args),
    "report": report_verb,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv:  # ours, not Hydra's: taken out wherever it stands
        os.environ["ARCHIFACTORY_DEBUG"] = "1"
        argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return VERBS[verb](rest)
    except ArchiFactoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"interrupted: {stop}" if str(stop) else "interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if guard.debug_enabled():
            raise
        if guard.is_config_error(error):
            print(guard.config_error_line(error), file=sys.stderr)
        else:
            print(guard.unexpected_error_line(error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`archifactory <verb> [hydra overrides…]`: pops the verb and hands the rest to Hydra.

Verbs that run a job (`train`, and later ones) are Hydra apps over the same `configs/`, so overrides,
`-m` multirun, `--cfg job`, `--help` and `hydra/launcher=…` behave as Hydra users expect. `list` prints
every option of every config group. Every failure is one `error:` line on stderr and a non-zero exit
(`archifactory.cli.guard`): a user error as is, a compose error folded onto one line, anything unexpected
with its type and the log file holding the traceback; `--debug` (or `ARCHIFACTORY_DEBUG=1`) re-raises.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable

from archifactory.cli import guard
from archifactory.core.errors import ArchiFactoryError

USAGE = """usage: archifactory [--debug] <verb> [key=value ...] [-m] [--cfg job] [--help]

verbs:
  train      train one model (or a sweep with -m) and write a run directory
  data       `data prepare dataset=…`: tokenize and pack a dataset into cached token shards
  eval       `eval <task>[,<task>…] [run=…]`: lm-eval tasks (mmlu, …) and perplexity/bits per byte of a run
  sft        `sft init_from=<run> dataset=chat_jsonl|limo|dolphin_r1`: instruction-tune a pretrained run
  grpo       `grpo init_from=<run> dataset=arith|countdown|gsm8k|math|rl_jsonl`: RL with verifiable rewards
  generate   `generate [run=…] prompt="…"`: stream text from a trained run (prompt_file=… for JSONL)
  export     `export [run=…] [out=…] [step=…] [format=hf|deepseek_v3]`: a checkpoint in Hugging Face format
  list       every option of every config group, with its description
             (`list --params model.target_params=30M`: the matched shape of every mixin x FFN)
  report     `report <sweep dir | run dir ...>`: results table (mean ± std over seeds) and plots
  study      `study -m <sweep overrides> study.dir=… [study.sft=<chat set>] [study.eval=perplexity,…]`:
             pretrain -> SFT -> evals per variant, resumable, one report (docs/study.md)
  plan       `plan [overrides…] [plan.world_size=N] [plan.mfu=0.4]`: parameters, FLOPs, memory per GPU
             and wall time of a run, from the meta device (no data, no GPU)

--debug (or ARCHIFACTORY_DEBUG=1): show the traceback of an unexpected error instead of one line

examples:
  archifactory train mixin=gqa ffn=swiglu
  archifactory train -m positional=rope,alibi seed=0,1
  archifactory train dataset=text dataset.path=./my_corpus model=tiny trainer=cpu
"""


# Each verb's module is imported when that verb runs: `archifactory list` does not load torch's model code,
# and `eval` alone needs the eval extra (lm-eval).
def _train(args: list[str]) -> int:
    from archifactory.cli.train import train_main

    return train_main(args)


def _data(args: list[str]) -> int:
    from archifactory.cli.data import data_main

    return data_main(args)


def _list(args: list[str]) -> int:
    from archifactory.cli.list import list_options

    return list_options(args)


def _eval(args: list[str]) -> int:
    from archifactory.cli.eval import eval_main

    return eval_main(args)


def _sft(args: list[str]) -> int:
    from archifactory.cli.sft import sft_main

    return sft_main(args)


def _grpo(args: list[str]) -> int:
    from archifactory.cli.grpo import grpo_main

    return grpo_main(args)


def _generate(args: list[str]) -> int:
    from archifactory.cli.generate import generate_verb

    return generate_verb(args)


def _export(args: list[str]) -> int:
    from archifactory.cli.generate import export_verb

    return export_verb(args)


def _plan(args: list[str]) -> int:
    from archifactory.cli.plan import plan_main

    return plan_main(args)


def _study(args: list[str]) -> int:
    from archifactory.cli.study import study_main

    return study_main(args)


def _report(args: list[str]) -> int:
    from archifactory.cli.report import report_cli

    return report_cli(args)


VERBS: dict[str, Callable[[list[str]], int]] = {
    "train": _train,
    "data": _data,
    "list": _list,
    "eval": _eval,
    "sft": _sft,
    "grpo": _grpo,
    "generate": _generate,
    "export": _export,
    "report": _report,
    "plan": _plan,
    "study": _study,
}


# Python's cyclic garbage collector runs each time allocations outnumber deallocations by its first threshold
# (700 by default). Importing torch, transformers and Hydra and composing a config make millions of short-lived
# objects and few cycles: at the defaults the collector ran ~11,000 times in a test worker (16 s of CPU) and
# took ~10% of a short command's time. At these thresholds it runs about a tenth as often; cycles are still
# collected (tests/conftest.py gives the test processes the same).
GC_THRESHOLDS = (20_000, 20, 50)


def collect_garbage_less_often() -> None:
    """This process's garbage-collection thresholds: `GC_THRESHOLDS`."""
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    collect_garbage_less_often()
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

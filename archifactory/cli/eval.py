"""`archifactory eval <name>[,<name>…] [run=…] [eval.<key>=value …]`: the evaluation dispatcher.

    archifactory eval mmlu                                  # the most recent completed run under outputs/
    archifactory eval hellaswag,arc_easy run=outputs/gqa_swiglu_rope_tiny_text_s0 eval.limit=100
    archifactory eval perplexity run=multirun/2026-01-01_00-00-00      # every completed run of a sweep
    archifactory eval perplexity dataset=text dataset.path=./other_corpus
    archifactory eval my_task eval.include_path=./my_lm_eval_tasks     # local lm-eval YAML tasks, offline

`run=` is a run directory, a run name under `outputs/`, or a folder holding runs (a sweep): every
completed run in it that the names apply to is evaluated — a run they do not apply to (a synthetic-probe
run for perplexity or an lm-eval task, a text run for `accuracy`) is skipped with one line, and a run
whose evaluation fails gets one `error: <run>: …` line while the others still run; the table then shows
every result that finished, and the exit status is 1 only when a run failed. Without `run=`, the most
recently finished run (named on the first line). Each name goes to one *runner*; the dispatcher loads
each run once (`archifactory.runs.load_run`, newest finished checkpoint or `eval.step`), calls the
runners, then writes `<run>/eval/<name>.json`, the `eval` section of `summary.json` and a table
(`archifactory.eval.results`).

Adding an evaluation (the plug-in point): write `run_<thing>(job: EvalJob) -> list[TaskResult]` in a
module of this package (see `archifactory/eval/job.py` for both types; `perplexity.py` is the smallest
example) and add one line to `RUNNERS` below: the name users type, `"module:function"` (imported only
when used, so a runner's heavy dependencies cost nothing elsewhere), a one-line description for `--help`,
and the extra top-level keys it accepts (perplexity takes `dataset=…`). A name in `RUNNERS` wins over an
lm-eval task of the same name; every other name is an lm-eval task or group (`harness.run_lm_eval`).
Options every runner may read live in `EvalConfig` (`eval.<key>=value`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.job import EvalConfig, EvalJob, TaskResult
from archifactory.runs import layout


@dataclass(frozen=True)
class Runner:
    target: str  # "module:function", the function being `(EvalJob) -> list[TaskResult]`
    description: str
    accepts: tuple[str, ...] = ()  # extra top-level keys it reads: `key=…` and `key.sub=…`
    model_free_with: str | None = None  # with this key given and no run=, it runs without loading a model
    scores: str = "text"  # the runs it applies to: "text" (a tokenizer) or "probe" (synthetic token ids)

    def load(self) -> Callable[[EvalJob], list[TaskResult]]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


RUNNERS: dict[str, Runner] = {
    "accuracy": Runner(
        "archifactory.eval.probe:run_accuracy",
        "answer accuracy of a synthetic-probe run (dataset=mqar|mad) on its fixed validation set",
        scores="probe",
    ),
    "perplexity": Runner(
        "archifactory.eval.perplexity:run_perplexity",
        "loss, perplexity and bits per byte on a validation split (the run's own, or dataset=…)",
        accepts=("dataset",),
    ),
    "mqar": Runner(
        "archifactory.eval.recall:run_mqar",
        "zero-shot multi-query associative recall of a text run, in its own vocabulary (eval.mqar_*)",
    ),
    "humaneval": Runner(
        "archifactory.eval.humaneval_run:run_humaneval",
        "HumanEval pass@k, the model's code executed in a sandbox (or completions=<file.jsonl>, no model)",
        accepts=("completions",),
        model_free_with="completions",
    ),
}
LM_EVAL = Runner("archifactory.eval.harness:run_lm_eval", "any lm-eval task or group (mmlu, hellaswag, …)")


def usage() -> str:
    options = "\n".join(f"  eval.{f.name}={f.default}" for f in fields(EvalConfig))
    runners = "\n".join(f"  {name:<12} {runner.description}" for name, runner in RUNNERS.items())
    return (
        "usage: archifactory eval <name>[,<name>...] [run=<run dir|sweep folder|run name>] [eval.<key>=value ...]\n\n"
        f"names:\n{runners}\n  {'<task>':<12} {LM_EVAL.description}\n\n"
        f"options (defaults):\n{options}\n\n"
        "examples:\n"
        "  archifactory eval mmlu eval.num_fewshot=5\n"
        "  archifactory eval perplexity run=outputs/<run_name>\n"
        "  archifactory eval humaneval eval.n_samples=20 eval.temperature=0.8\n"
        "  archifactory eval humaneval completions=samples.jsonl   # score a file, no model\n"
        "  archifactory eval my_task eval.include_path=./my_tasks   # local lm-eval YAMLs, no Hub needed\n"
    )


@dataclass
class Request:
    names: list[str]
    run: str | None
    options: EvalConfig
    extra: list[str]


def parse(args: list[str]) -> Request:
    """Split `<names> key=value …` into names, run=, eval.* (typed, checked) and runner-specific keys."""
    from omegaconf import OmegaConf

    if not args or "=" in args[0] or args[0].startswith("-"):
        raise ArchiFactoryError(
            "usage: archifactory eval <name>[,<name>...] [run=...] [eval.<key>=value ...] "
            "(archifactory eval --help lists the names and options)"
        )
    names = [name for name in args[0].split(",") if name]
    run, dotlist, extra = None, [], []
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ArchiFactoryError(
                f"expected key=value, got {arg!r} (the task names go first, comma-separated)"
            )
        if key == "run":
            run = value
        elif key.startswith("eval."):
            dotlist.append(f"{key.removeprefix('eval.')}={value}")
        else:
            extra.append(arg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(dotlist))
        options = EvalConfig(**OmegaConf.to_container(merged))
    except Exception as error:  # OmegaConf names the key and the type it wanted
        first = str(error).splitlines()[0]
        raise ArchiFactoryError(f"bad eval option: {first} (archifactory eval --help lists them)") from error
    if options.batch_size < 1:
        raise ArchiFactoryError(f"eval.batch_size={options.batch_size} must be >= 1")
    if options.limit is not None and options.limit <= 0:
        raise ArchiFactoryError(f"eval.limit={options.limit} must be > 0 (a count, or a fraction below 1)")
    return Request(names, run, options, extra)


Step = tuple[Runner, list[str], list[str]]  # a runner, the names it evaluates, its extra args


def plan(names: list[str], extra: list[str]) -> list[Step]:
    """(runner, its names, its extra args): our runners one by one, all lm-eval tasks in one call."""
    steps: list[Step] = []
    harness = [name for name in names if name not in RUNNERS]
    for name in dict.fromkeys(names):
        if name in RUNNERS:
            runner = RUNNERS[name]
            steps.append(
                (runner, [name], [a for a in extra if a.split("=")[0].split(".")[0] in runner.accepts])
            )
    if harness:
        steps.append((LM_EVAL, list(dict.fromkeys(harness)), []))
    accepted = {key for runner, _, _ in steps for key in runner.accepts}
    for arg in extra:
        if arg.split("=")[0].split(".")[0] not in accepted:
            takers = [name for name, r in RUNNERS.items() if arg.split("=")[0].split(".")[0] in r.accepts]
            where = f"only {', '.join(takers)} reads it" if takers else "eval options are eval.<key>=value"
            raise ArchiFactoryError(f"unknown option {arg!r} for eval {','.join(names)}: {where}")
    return steps


def resolve_runs(run: str | None) -> tuple[list[Path], bool]:
    """(run dirs, whether `run` was a folder of runs): a run directory, a run name under outputs/, a folder
    of runs (its completed ones), or the latest."""
    from archifactory.runs.load import completed_runs, resolve_run

    if run is None or run == "":
        return [resolve_run(None)], False
    path = Path(run).expanduser()
    if not layout.config_path(path).is_file() and path.is_dir():
        runs = sorted(completed_runs(path))
        if not runs:
            raise ArchiFactoryError(
                f"run={run} holds no completed run (no {layout.SUMMARY} with status completed)"
            )
        return runs, True
    return [resolve_run(run)], False


def run_scores(run_dir: Path) -> str:
    """What a run can be scored on: "probe" (a synthetic probe's token ids) or "text"."""
    from archifactory.runs.load import load_run_config

    return "probe" if load_run_config(run_dir).dataset.get("source") == "synthetic" else "text"


def applicable(run_dir: Path, steps: list[Step]) -> tuple[list[Step], str | None]:
    """(the steps that apply to this run, one `skipped …` line naming the others and why, or None)."""
    kind = run_scores(run_dir)
    keep = [step for step in steps if step[0].scores == kind]
    left = [name for step in steps if step[0].scores != kind for name in step[1]]
    if not left:
        return keep, None
    why = (
        "a synthetic-probe run has token ids, no text: score it with `accuracy`"
        if kind == "probe"
        else "accuracy scores synthetic-probe runs (dataset=mqar|mad), this one was trained on text"
    )
    return keep, f"skipped {run_dir}: {','.join(left)} ({why})"


def failure_line(run_dir: Path, error: Exception) -> str:
    """One `error: <run>: …` line for a run whose evaluation failed (the traceback of a bug goes to the log)."""
    from archifactory.cli.guard import unexpected_error_line

    line = f"error: {error}" if isinstance(error, ArchiFactoryError) else unexpected_error_line(error)
    return f"error: {run_dir}: {line.removeprefix('error: ')}"


def resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ArchiFactoryError(
            f"eval.device={requested!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArchiFactoryError(f"eval.device={requested} but no CUDA device is visible; use eval.device=cpu")
    return device


def eval_main(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    request = parse(args)
    steps = plan(request.names, request.extra)
    if request.run is None and all(model_free(runner, extra) for runner, _, extra in steps):
        return eval_without_model(steps, request.options)
    run_dirs, folder = resolve_runs(request.run)

    from archifactory.eval.results import format_table
    from archifactory.train.runtime import autocast_factory

    device = resolve_device(request.options.device)
    autocast = autocast_factory(request.options.precision, device)
    rows: list[tuple[str, TaskResult]] = []
    failed = skipped = 0
    for run_dir in run_dirs:
        todo = steps
        if folder:  # a sweep folder: runs the names do not apply to are skipped, one line each
            todo, line = applicable(run_dir, steps)
            if line:
                print(line, flush=True)
            if not todo:
                skipped += 1
                continue
        try:
            evaluate_run(run_dir, todo, request.options, device, autocast, rows)
        except Exception as error:
            if not folder:
                raise
            print(failure_line(run_dir, error), file=sys.stderr, flush=True)
            failed += 1
    if skipped == len(run_dirs):
        raise ArchiFactoryError(
            f"none of the {len(run_dirs)} runs in run={request.run} can be scored by {','.join(request.names)} "
            "(each is named above)"
        )
    if rows:
        print(format_table(rows))
    return 1 if failed else 0


def evaluate_run(
    run_dir: Path,
    steps: list[Step],
    options: EvalConfig,
    device: Any,
    autocast: Callable[[], Any],
    rows: list[tuple[str, TaskResult]],
) -> None:
    """Load one run, run each step on it, write its results as each runner finishes and add them to the
    table's `rows` (so a later runner's failure keeps what finished, in the files and in the table)."""
    from archifactory.eval.results import write_results
    from archifactory.runs.load import load_run

    print(f"evaluating {run_dir}", flush=True)
    run = load_run(run_dir, device=device, step=options.step)
    print(f"  checkpoint step {run.step}, {run.params['total']:,} parameters, on {device}", flush=True)
    for runner, names, extra in steps:
        if run.tokenizer is None and runner is not RUNNERS["accuracy"]:
            raise ArchiFactoryError(
                f"run {run.name} is a synthetic probe (token ids, no text): evaluate it with `accuracy`"
            )
        job = EvalJob(names, run, options, device, autocast, extra)
        results = runner.load()(job)
        for path in write_results(run, results, options):
            print(f"  wrote {path}")
        rows.extend((run.name, result) for result in results)


def model_free(runner: Runner, extra: list[str]) -> bool:
    return runner.model_free_with is not None and any(
        arg.partition("=")[0] == runner.model_free_with for arg in extra
    )


def eval_without_model(steps: list[Step], options: EvalConfig) -> int:
    """Runners that need no model (`humaneval completions=…`): no run is loaded, each writes its own files."""
    import contextlib

    import torch

    from archifactory.eval.results import format_table

    rows: list[tuple[str, TaskResult]] = []
    for runner, names, extra in steps:
        job = EvalJob(names, None, options, torch.device("cpu"), contextlib.nullcontext, extra)
        results = runner.load()(job)
        rows.extend(("-", result) for result in results)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))

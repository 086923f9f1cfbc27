"""The study's stages: what each runs (an `archifactory` verb in a process of its own) and how it knows it is
done.

A study runs, per pretrained run, `eval` on the pretrained model, then each post-training stage in
`POST_STAGES` that the study names (its dataset under `study.<name>=`), each starting from the previous
stage's final run (`init_from=`), each followed by the same evaluations. Adding a post-training stage is
one entry, as GRPO (`archifactory grpo init_from=<run> dataset=<task>`, reported by its mean reward over the
last tenth of its steps) is — the runner needs nothing else, because every stage writes the run-directory
contract (`summary.json` with `status`, `eval/<name>.json`).

Every stage is resumable by the same rule: a run whose `summary.json` says `completed` is skipped, any
other is (re)started with `trainer.resume=true`, which continues from its newest checkpoint; an
evaluation whose `eval/<name>.json` exists is skipped.

Every stage runs in a process of its own (a failing or crashing stage is that stage's failure, and its memory
is returned), forked from the study's fork server: the server imports what a stage needs once (`PRELOAD`),
and each stage starts from that copy instead of importing torch, Dynamo and transformers again (an evaluation
stage 7 s -> 3.4 s, an SFT stage 10.5 s -> 5.4 s on the 2-core CPU: docs/study.md). The process runs the
`archifactory` program itself, as `python -m archifactory <verb> …` does.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from pathlib import Path

from archifactory.runs.records import read_summary


@dataclass(frozen=True)
class PostStage:
    """A post-training stage: `archifactory <verb> init_from=<previous run> dataset=<study.<name>>`."""

    name: str  # the `study.<name>=<dataset>` key and the run folder under the study
    verb: str
    metric: str  # the summary figure the report shows for it
    higher_is_better: bool = False  # the metric's direction: which variant is "best" in the report


POST_STAGES: tuple[PostStage, ...] = (
    PostStage("sft", "sft", "val_loss"),
    PostStage("grpo", "grpo", "reward", higher_is_better=True),
)


@dataclass
class StageResult:
    ok: bool
    detail: str = ""  # the failing command's last stderr line


# What every stage imports: loaded once in the fork server. torch._dynamo is what a torch optimizer imports on
# its first parameter group (1.2-1.7 s); a name that does not import (an extra not installed) is skipped.
PRELOAD = (
    "torch._dynamo",
    "transformers",
    "matplotlib",
    "archifactory.train.loop",
    "archifactory.sft.run",
    "archifactory.grpo.run",
    "archifactory.eval.evaluate",
)


def stage_context() -> BaseContext:
    """The fork server with `PRELOAD` where the platform has one (Linux, macOS); plain spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def _stage_process(args: list[str], log: Path, errors: Path, environment: dict[str, str]) -> None:
    """A stage's process: the `archifactory` program with `args`, stdout appended to `log`, stderr to `errors`,
    the study's environment of the moment; its exit status is the program's."""
    os.environ.clear()
    os.environ.update(environment)
    for descriptor, path in ((1, log), (2, errors)):
        with path.open("ab") as target:
            os.dup2(target.fileno(), descriptor)
    sys.argv = ["archifactory", *args]
    runpy.run_module("archifactory", run_name="__main__", alter_sys=True)


def run_verb(args: list[str], log: Path) -> StageResult:
    """`archifactory <args>` in a process of its own, its output appended to `log`; the last stderr line on
    failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ archifactory {' '.join(args)}\n")
    descriptor, name = tempfile.mkstemp(prefix="archifactory-stage-", suffix=".stderr")
    os.close(descriptor)
    errors = Path(name)
    try:
        process = stage_context().Process(target=_stage_process, args=(args, log, errors, dict(os.environ)))
        process.start()
        try:
            process.join()
        except BaseException:  # the study stops (Ctrl-C): so does its stage, recording where it was
            process.terminate()
            process.join()
            raise
        stderr = errors.read_text(errors="replace")
    finally:
        errors.unlink(missing_ok=True)
    with log.open("a") as out:
        out.write(stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return StageResult(process.exitcode == 0, lines[-1] if lines else f"exit status {process.exitcode}")


def completed(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "completed"


def missing_evals(run_dir: Path, names: list[str]) -> list[str]:
    """The evaluations of `names` whose result the run's `summary.json` does not hold yet (the eval verb
    writes `eval/<name>.json` first, then the summary's `eval.<name>`)."""
    section = (read_summary(run_dir) or {}).get("eval") or {}
    return [name for name in names if name not in section]

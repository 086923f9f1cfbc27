"""The study's stages: what each runs (an `archifactory` verb in a subprocess) and how it knows it is done.

A study runs, per pretrained run, `eval` on the pretrained model, then each post-training stage in
`POST_STAGES` that the study names (its dataset under `study.<name>=`), each starting from the previous
stage's final run (`init_from=`), each followed by the same evaluations. Adding a post-training stage is
one entry, as GRPO (`archifactory grpo init_from=<run> dataset=<task>`, reported by its mean reward over the
last tenth of its steps) is — the runner needs nothing else, because every stage writes the run-directory
contract (`summary.json` with `status`, `eval/<name>.json`).

Every stage is resumable by the same rule: a run whose `summary.json` says `completed` is skipped, any
other is (re)started with `trainer.resume=true`, which continues from its newest checkpoint; an
evaluation whose `eval/<name>.json` exists is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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


def run_verb(args: list[str], log: Path) -> StageResult:
    """`python -m archifactory <args>` with its output appended to `log`; the last stderr line on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ archifactory {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, "-m", "archifactory", *args],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        out.write(done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return StageResult(done.returncode == 0, lines[-1] if lines else f"exit status {done.returncode}")


def completed(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "completed"


def missing_evals(run_dir: Path, names: list[str]) -> list[str]:
    """The evaluations of `names` whose result the run's `summary.json` does not hold yet (the eval verb
    writes `eval/<name>.json` first, then the summary's `eval.<name>`)."""
    section = (read_summary(run_dir) or {}).get("eval") or {}
    return [name for name in names if name not in section]

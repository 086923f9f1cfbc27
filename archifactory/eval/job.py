"""What the `eval` dispatcher hands a runner (`EvalJob`) and what a runner hands back (`TaskResult`).

A runner is a function `run(job: EvalJob) -> list[TaskResult]`. It evaluates `job.names` on `job.run`
(a loaded model + tokenizer + config, see `archifactory.runs.LoadedRun`) with the user's `eval.*`
options, and returns one `TaskResult` per name it reports. The dispatcher does the rest: the results
files, the `eval` section of `summary.json` and the terminal table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from archifactory.runs import LoadedRun


@dataclass
class EvalConfig:
    """The `eval.<key>=value` options (typed: a typo or a wrong type is refused in one line)."""

    num_fewshot: int | None = None  # lm-eval: few-shot examples (None: each task's default)
    limit: float | None = None  # lm-eval: examples per task (>= 1: a count, < 1: a fraction)
    batch_size: int = 16  # forward rows per batch
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    include_path: str | None = None  # lm-eval: a folder of local task YAMLs (the offline path)
    step: int | None = None  # the checkpoint to evaluate (None: the newest finished one)
    seed: int = 1234  # lm-eval's numpy/torch/few-shot seeds (its default)
    max_gen_toks: int = 256  # lm-eval generation tasks that set no max_gen_toks
    bootstrap_iters: int = 100000  # lm-eval: bootstrap resamples for non-mean metrics' stderr (0: none)
    log_samples: bool = False  # lm-eval: keep every sample's prompt and answer in eval/<task>.json
    max_tokens: int | None = None  # perplexity: validation tokens to read (None: the whole split)
    show_progress: bool = True  # progress bars


@dataclass
class EvalJob:
    """One runner's share of an `archifactory eval` command, for one run."""

    names: list[str]  # the task names this runner is asked for, as the user typed them
    run: LoadedRun
    options: EvalConfig
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    extra: list[str] = field(default_factory=list)  # runner-specific key=value overrides (`dataset=…`)


@dataclass
class TaskResult:
    """One line of the results table and one `eval/<name>.json` file."""

    name: str  # file name and key in summary.json's `eval` section
    metric: str  # the headline metric (`acc`, `perplexity`, `pass@1`, …)
    value: float
    stderr: float | None
    details: dict[str, Any]  # everything else, written to eval/<name>.json (lm-eval's full output …)
    extra: dict[str, Any] = field(default_factory=dict)  # more figures for summary.json (bpb, n-shot …)

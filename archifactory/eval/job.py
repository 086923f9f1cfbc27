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

from archifactory.runs.load import LoadedRun


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
    n_samples: int = 1  # humaneval: completions per problem (pass@k for every k <= n among 1, 10, 100)
    temperature: float = 0.0  # humaneval: sampling temperature (0 = greedy)
    top_p: float = 0.95  # humaneval: nucleus sampling when temperature > 0
    max_new_tokens: int | None = None  # humaneval: tokens per completion (None: min(512, half the context))
    workers: int = 0  # humaneval: completions executed in parallel (0: one per CPU core)
    sandbox: str = "auto"  # humaneval: auto (bwrap, else unshare) | bwrap | unshare | none
    allow_unsandboxed: bool = False  # humaneval: with no sandbox, run model-written code unconfined
    timeout: float = 10.0  # humaneval: wall-clock (and CPU) seconds per completion
    memory_mb: int = 1024  # humaneval: address space per sandboxed process
    mqar_seq_len: int = 64  # mqar: length of each zero-shot recall example
    mqar_pairs: int = 4  # mqar: key-value pairs per example
    mqar_examples: int = 500  # mqar: examples scored (drawn from eval.seed)


@dataclass
class EvalJob:
    """One runner's share of an `archifactory eval` command, for one run."""

    names: list[str]  # the task names this runner is asked for, as the user typed them
    run: LoadedRun | None  # None only for a runner's model-free form (`Runner.model_free_with`)
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

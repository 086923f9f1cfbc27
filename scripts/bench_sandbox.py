"""Per-completion cost of the HumanEval sandbox vs a bare subprocess, and the 164 canonical solutions.

    python scripts/bench_sandbox.py [--problems 40] [--workers 2]

Sequential runs (one worker) of the first `--problems` canonical solutions give the per-completion
latency of each mode: `bare` is a plain `python -I -S` subprocess with the same launcher and limits (the
`none` mode), so the difference is what bwrap / unshare add. Then all 164 solutions run through the
auto-selected sandbox on `--workers` workers; every one must pass.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from archifactory.eval.humaneval import ExecutionSettings, execute, load_problems, make_sandbox
from archifactory.eval.sandbox import Limits, Sandbox, available_mode


def latency(mode: str, problems: dict, samples: list) -> list[float]:
    sandbox = Sandbox(mode, Limits())
    results = execute(problems, samples, sandbox, workers=1)
    failed = [r.task_id for r in results if r.outcome != "passed"]
    if failed:
        raise SystemExit(f"{mode}: canonical solutions failed: {failed[:5]}")
    return [r.seconds for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=40, help="canonical solutions timed one at a time")
    parser.add_argument("--workers", type=int, default=2, help="workers for the full 164-problem run")
    args = parser.parse_args()
    problems = load_problems()
    samples = [(task, 0, problem["canonical_solution"]) for task, problem in problems.items()]
    timed = samples[: args.problems]
    modes = ["none"] + [m for m in ("bwrap", "unshare") if shutil.which(m)]
    medians = {}
    print(f"per completion, {len(timed)} canonical solutions one at a time (seconds):")
    print(f"{'mode':<8} {'median':>8} {'mean':>8} {'p90':>8} {'overhead vs bare':>18}")
    for mode in modes:
        seconds = latency(mode, problems, timed)
        medians[mode] = statistics.median(seconds)
        p90 = statistics.quantiles(seconds, n=10)[-1]
        overhead = "" if mode == "none" else f"{medians[mode] - medians['none']:+.3f} s"
        name = "bare" if mode == "none" else mode
        print(f"{name:<8} {medians[mode]:>8.3f} {statistics.mean(seconds):>8.3f} {p90:>8.3f} {overhead:>18}")
    mode = available_mode("auto")
    start = time.perf_counter()
    results = execute(problems, samples, make_sandbox(ExecutionSettings()), workers=args.workers)
    seconds = time.perf_counter() - start
    passed = sum(r.outcome == "passed" for r in results)
    print(
        f"all {len(samples)} canonical solutions through {mode}, {args.workers} workers: "
        f"{passed}/{len(samples)} passed in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()

"""Where evaluation results go: `<run dir>/eval/<name>.json`, the `eval` section of `summary.json`, a table.

`eval/<name>.json` holds the runner's full details (lm-eval's whole output for that task and its
subtasks, or the perplexity figures) under `results`, next to the model's identity: run name and
directory, checkpoint step, parameter counts, mixin/ffn/positional, and the eval options.

`summary.json` gains (or updates) `eval.<name>`: `{metric, value, stderr, step, …}`. The rest of the
summary is left as it is (a read-modify-write under the run's summary lock, `archifactory.runs.records`),
and the file is replaced atomically, so a failed evaluation loses nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from archifactory.eval.job import EvalConfig, TaskResult
from archifactory.runs import layout
from archifactory.runs.files import write_json_atomic
from archifactory.runs.load import LoadedRun
from archifactory.runs.records import modify_summary


def identity(run: LoadedRun) -> dict[str, Any]:
    cfg = run.config
    return {
        "run_name": run.name,
        "run_dir": str(run.run_dir.resolve()),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "mixin": cfg.mixin.name,
        "ffn": cfg.ffn.name,
        "positional": cfg.positional.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "params_total": run.params.get("total"),
        "params_non_embedding": run.params.get("non_embedding"),
        "max_seq_len": int(cfg.model.max_seq_len),
        "tokenizer": None if run.tokenizer is None else run.tokenizer.name,  # None: a synthetic probe
    }


def write_results(run: LoadedRun, results: list[TaskResult], options: EvalConfig) -> list[Path]:
    """Write eval/<name>.json for each result and merge them into summary.json; return the files."""
    folder = layout.eval_dir(run.run_dir)
    folder.mkdir(exist_ok=True)
    model = identity(run)
    written = []
    for result in results:
        payload = {
            "task": result.name,
            "metric": result.metric,
            "value": result.value,
            "stderr": result.stderr,
            "model": model,
            "options": dataclasses.asdict(options),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "results": result.details,
        }
        path = folder / f"{result.name.replace('/', '_')}.json"
        write_json_atomic(path, payload)
        written.append(path)

    def add_section(summary: dict[str, Any]) -> None:
        section = summary.get("eval") if isinstance(summary.get("eval"), dict) else {}
        for result in results:
            section[result.name] = {
                "metric": result.metric,
                "value": result.value,
                "stderr": result.stderr,
                "step": run.step,
                **result.extra,
            }
        summary["eval"] = section

    modify_summary(
        run.run_dir, add_section
    )  # under the summary lock: a run training meanwhile keeps its keys
    return written


def format_table(rows: list[tuple[str, TaskResult]]) -> str:
    """run | task | metric | value | stderr, aligned."""
    header = ("run", "task", "metric", "value", "± stderr")
    lines = [header] + [
        (run, r.name, r.metric, f"{r.value:.4f}", "" if r.stderr is None else f"{r.stderr:.4f}")
        for run, r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in text)

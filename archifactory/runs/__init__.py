"""THE run-directory module: what a run directory holds and every read and write of it.

    from archifactory.runs import load_run, resolve_run
    run = load_run(resolve_run(None))        # the most recent completed run under outputs/

- `layout`      — the file names (the only place that spells them) and path helpers;
- `files`       — atomic writes and defensive JSON reads;
- `records`     — `summary.json` (read-modify-write under the summary lock) and `metrics.jsonl`;
- `lock`        — the run lock (`RunDirLock`) and the summary lock;
- `log`         — the run's `archifactory.log`;
- `checkpoints` — finished-checkpoint discovery and verified weight loading;
- `load`        — resolve a run, load its config, tokenizer and model (`load_run`).

The names of `load` are re-exported here on first use (`archifactory.runs.load_run` is public API), so
importing a light submodule such as `layout` does not load torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOAD_NAMES = (
    "LoadedRun",
    "completed_runs",
    "latest_completed_run",
    "load_run",
    "load_run_config",
    "load_run_tokenizer",
    "resolve_run",
    "save_run_tokenizer",
)

__all__ = list(_LOAD_NAMES)


def __getattr__(name: str) -> Any:
    if name in _LOAD_NAMES:
        return getattr(importlib.import_module("archifactory.runs.load"), name)
    raise AttributeError(f"module 'archifactory.runs' has no attribute {name!r}")

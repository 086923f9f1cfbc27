"""`summary.json` and `metrics.jsonl`: every read and write of them goes through here.

- `update_summary` / `modify_summary` are the only writers of `summary.json`: each is a read-modify-write
  under `summary_lock` (a short `flock` on `.summary.lock`), so `archifactory eval` writing its `eval`
  section while the same run trains (or resumes) loses neither section: each writer changes only its keys.
- `read_metrics` drops a torn last line (a kill mid-append) with a warning and skips any other line that
  is not a JSON object; `read_summary` returns None for a missing or damaged `summary.json`, and
  `rebuild_summary` recovers what the metrics and checkpoints still say.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archifactory.runs import layout
from archifactory.runs.files import read_json, write_atomic, write_json_atomic
from archifactory.runs.lock import summary_lock

log = logging.getLogger(__name__)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """`summary.json`, or None (with a warning when the file exists but is damaged)."""
    path = layout.summary_path(run_dir)
    summary = read_json(path)
    if summary is None and path.exists():
        log.warning("%s is damaged (empty, torn or not a JSON object); ignoring it", path)
    return summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a torn last line is dropped with a warning, other bad lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            where = "its torn last line" if number == len(lines) else f"line {number} (not a JSON object)"
            log.warning("%s: dropping %s", path, where)
            continue
        records.append(record)
    return records


def rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def rebuild_summary(
    run_dir: Path, base: dict[str, Any], checkpoint_meta: dict[str, Any] | None
) -> dict[str, Any]:
    """What a damaged `summary.json` can be rebuilt from: the last checkpoint and the logged metrics."""
    summary = dict(base)
    if checkpoint_meta:
        summary.update(steps=checkpoint_meta.get("step"), tokens_seen=checkpoint_meta.get("tokens_seen"))
    for record in read_metrics(layout.metrics_path(run_dir)):
        if checkpoint_meta and record.get("step", 0) > checkpoint_meta.get("step", 0):
            break
        for key in ("train_loss", "val_loss", "val_bpb"):
            if record.get(key) is not None:
                summary[key] = record[key]
    summary["rebuilt"] = True
    return summary


def modify_summary(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `change` to the current `summary.json` (empty when missing or damaged) under the summary lock
    and write it back atomically; returns what was written."""
    with summary_lock(run_dir):
        summary = read_json(layout.summary_path(run_dir)) or {}
        change(summary)
        write_json_atomic(layout.summary_path(run_dir), summary)
    return summary


def replace_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write `summary` as the whole `summary.json` (a rebuilt one: the old file was damaged)."""
    with summary_lock(run_dir):
        write_json_atomic(layout.summary_path(run_dir), summary)


def update_summary(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Set `values`' keys in `summary.json`, keeping every other key (another writer's section)."""
    return modify_summary(run_dir, lambda summary: summary.update(values))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One record appended to `metrics.jsonl` (a kill mid-write leaves a torn line `read_metrics` drops)."""
    with layout.metrics_path(run_dir).open("a") as handle:
        handle.write(json.dumps(record) + "\n")

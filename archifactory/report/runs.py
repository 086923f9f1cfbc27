"""Reading run directories for the report: summaries, metrics, overrides, and variants across seeds.

A run directory is any folder with a `summary.json` (what `archifactory train` writes; a failed sweep
job gets one too, see `archifactory/sweep.py`). A sweep folder is searched for them. Runs are grouped
into *variants*: runs whose command-line overrides agree on everything but the seed. A variant is named
by the overrides that differ between variants (e.g. `mixin=rwkv6`), or by its mixin/ffn/positional when
the overrides do not tell runs apart. A variant counts each seed once: when several completed runs share
a seed (a rerun, a copy), the newest (summary.json last written) is kept and the others are set aside in
`Variant.duplicates`, so n is the number of distinct seeds and no seed weighs twice in a mean or a test.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs import layout
from archifactory.runs.records import read_metrics

# Overrides that never define a variant: the seed, where outputs go, and how the job is run.
_NOT_VARIANT = ("seed", "run_name", "trainer.resume", "hydra.", "hydra/", "trainer.device", "wandb.")


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str]
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "unknown")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def written(self) -> float:
        """When summary.json was last written (seconds since the epoch): which of two reruns is newer."""
        try:
            return layout.summary_path(self.path).stat().st_mtime
        except OSError:
            return 0.0

    def number(self, key: str) -> float | None:
        """A numeric summary figure (dotted keys reach into sections: `eval.mmlu.value`)."""
        value: Any = self.summary
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def load_run(path: Path) -> Run:
    try:
        summary = json.loads(layout.summary_path(path).read_text())
    except (OSError, ValueError) as error:
        raise ArchiFactoryError(f"{layout.summary_path(path)} cannot be read: {error}") from error
    overrides: dict[str, str] = {}
    for item in _read_yaml(layout.overrides_path(path)) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    metrics = read_metrics(layout.metrics_path(path))  # a line cut by a kill is dropped: the rest is good
    config = _read_yaml(layout.config_path(path)) or {}
    return Run(path, summary if isinstance(summary, dict) else {}, overrides, config, metrics)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run dir in `paths` (each a run dir, or a folder searched for run dirs), in path order."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ArchiFactoryError(f"{path} does not exist")
        if layout.summary_path(path).is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob(layout.SUMMARY) if layout.HYDRA_DIR not in p.parts)
    if not found:
        raise ArchiFactoryError(
            f"no run directory (a folder with {layout.SUMMARY}) in {', '.join(map(str, paths))}"
        )
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [load_run(p) for p in unique]


def _is_variant_key(key: str) -> bool:
    return not any(key == k or key.startswith(k) for k in _NOT_VARIANT)


def variant_labels(runs: list[Run]) -> list[str]:
    """One label per run: the variant-defining overrides that are not the same in every run."""
    keys = sorted({k for run in runs for k in run.overrides if _is_variant_key(k)})
    differing = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    labels = []
    for run in runs:
        parts = [f"{k}={run.overrides[k]}" for k in differing if k in run.overrides]
        if not parts:
            s = run.summary
            parts = [str(s.get(k)) for k in ("mixin", "ffn", "positional") if s.get(k) is not None]
        labels.append(" ".join(parts) or run.path.name)
    if len({bool(run.summary.get("document_mask")) for run in runs}) > 1:
        # document masking changes what the model sees: a masked run is never pooled with unmasked ones
        labels = [
            f"{label} [document_mask]" if run.summary.get("document_mask") else label
            for label, run in zip(labels, runs)
        ]
    return labels


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; None for one value) of one figure over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Variant:
    label: str
    runs: list[Run]  # one completed run per seed (plus the runs that did not complete)
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (left out, the kept run of its seed)

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.completed]

    @property
    def failed(self) -> list[Run]:
        return [run for run in self.runs if not run.completed]

    def stat(self, key: str) -> Stat:
        return Stat([v for v in (run.number(key) for run in self.completed) if v is not None])

    def first(self, key: str) -> float | None:
        """A figure that does not change with the seed (parameter counts, FLOPs): the first run's."""
        for run in self.completed or self.runs:
            value = run.number(key)
            if value is not None:
                return value
        return None

    def by_seed(self, key: str) -> dict[Any, float]:
        return {run.seed: v for run in self.completed if (v := run.number(key)) is not None}


def group_variants(runs: list[Run]) -> list[Variant]:
    """Runs grouped by variant label, each seed's completed run counted once (`one_run_per_seed`)."""
    variants: dict[str, Variant] = {}
    for label, run in zip(variant_labels(runs), runs):
        variants.setdefault(label, Variant(label, [])).runs.append(run)
    for variant in variants.values():
        one_run_per_seed(variant)
    return list(variants.values())


def one_run_per_seed(variant: Variant) -> None:
    """Keep the newest completed run of each seed in `variant.runs`; the older ones go to `duplicates`."""
    newest: dict[str, Run] = {}
    for run in variant.completed:
        kept = newest.get(str(run.seed))
        if kept is None or run.written > kept.written:
            newest[str(run.seed)] = run
    for run in variant.completed:
        kept = newest[str(run.seed)]
        if run is not kept:
            variant.duplicates.append((run, kept))
    dropped = {id(run) for run, _ in variant.duplicates}
    variant.runs = [run for run in variant.runs if id(run) not in dropped]


def duplicate_warning(variants: list[Variant]) -> str | None:
    """One line naming every run left out because a newer run of its variant has the same seed."""
    pairs = [(v, old, kept) for v in variants for old, kept in v.duplicates]
    if not pairs:
        return None
    named = "; ".join(
        f"{v.label} seed {old.seed}: {old.path} (kept {kept.path.name})" for v, old, kept in pairs
    )
    return (
        f"{len(pairs)} run(s) repeat a seed of their variant and are left out (the newest run of each seed "
        f"counts once): {named}"
    )


def eval_keys(variants: list[Variant]) -> list[tuple[str, str]]:
    """(summary key, column title) for every numeric score present: `eval.<task>.value` sections
    (`archifactory eval`), `val_accuracy` (probe datasets) and `reward` (GRPO runs). Absent everywhere: no column."""
    keys: dict[str, str] = {}
    for variant in variants:
        for run in variant.runs:
            section = run.summary.get("eval")
            if isinstance(section, dict):
                for task, result in sorted(section.items()):
                    if isinstance(result, dict) and run.number(f"eval.{task}.value") is not None:
                        keys.setdefault(f"eval.{task}.value", f"{task} {result.get('metric') or ''}".strip())
                    elif isinstance(result, (int, float)):
                        keys.setdefault(f"eval.{task}", task)
            if run.number("val_accuracy") is not None:
                keys.setdefault("val_accuracy", "val accuracy")
            if run.number("reward") is not None:  # `archifactory grpo`: mean reward of the last 10% of steps
                keys.setdefault("reward", "reward")
    return list(keys.items())

"""The results table: one row per variant, mean ± std over seeds, and a significance test against the best.

**Which test.** The best variant is the one with the lowest mean final validation loss. Every other
variant is compared with it on the final validation loss of each seed. Seeds of one sweep share the
data order and the initial RNG state, so when both variants have at least two seeds in common the test
is a *paired t-test over those seeds* (Student, 1908): t = mean(d) / (sd(d)/√n) on the per-seed
differences d, n − 1 degrees of freedom. Otherwise, with at least two seeds each, *Welch's t-test*
(Welch, 1947). Two-sided p-values; "yes" when p < 0.05, i.e. the gap exceeds what the seed-to-seed
spread explains at that level. With one seed there is no spread to compare with: "n/a". With few seeds
the test has little power — two seeds give a paired t-test one degree of freedom — so "no" often means
"not shown", not "equal".
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from typing import Any

from archifactory.report.runs import Stat, Variant, eval_keys

ALPHA = 0.05
METRIC = "val_loss"


@dataclass
class Comparison:
    test: str  # "paired t" | "Welch t" | "best" | "n/a"
    gap: float | None  # mean metric minus the best variant's
    p_value: float | None

    @property
    def verdict(self) -> str:
        if self.test == "best":
            return "best"
        if self.p_value is None:
            return "n/a"
        return "yes" if self.p_value < ALPHA else "no"


def compare(variant: Variant, best: Variant, metric: str = METRIC) -> Comparison:
    """The gap of `variant` to `best` on `metric` and whether it exceeds the seed-to-seed spread."""
    from scipy import stats

    if variant is best:
        return Comparison("best", 0.0, None)
    mine, theirs = variant.stat(metric), best.stat(metric)
    gap = None if mine.mean is None or theirs.mean is None else mine.mean - theirs.mean
    pairs = variant.by_seed(metric), best.by_seed(metric)
    common = sorted(set(pairs[0]) & set(pairs[1]), key=str)
    if len(common) >= 2:
        differences = [pairs[0][s] - pairs[1][s] for s in common]
        if all(d == differences[0] for d in differences):  # no spread at all: t is infinite or undefined
            return Comparison("paired t", gap, 0.0 if differences[0] != 0 else 1.0)
        result = stats.ttest_rel([pairs[0][s] for s in common], [pairs[1][s] for s in common])
        return Comparison("paired t", gap, float(result.pvalue))
    if mine.n >= 2 and theirs.n >= 2:
        if (mine.std or 0) == 0 and (theirs.std or 0) == 0:
            return Comparison("Welch t", gap, 0.0 if gap else 1.0)
        result = stats.ttest_ind(mine.values, theirs.values, equal_var=False)
        return Comparison("Welch t", gap, float(result.pvalue))
    return Comparison("n/a", gap, None)


def rank(variants: list[Variant], metric: str = METRIC) -> list[Variant]:
    """Best (lowest mean metric) first; variants without a finished run last, in their order."""
    scored = [v for v in variants if v.stat(metric).mean is not None]
    unscored = [v for v in variants if v.stat(metric).mean is None]
    return sorted(scored, key=lambda v: v.stat(metric).mean) + unscored


# (summary key, column title, how it is aggregated): "first" = a figure fixed by the shape
FIXED_COLUMNS = [
    ("params_total", "params", "first"),
    ("params_non_embedding", "non-emb params", "first"),
    ("params_active", "active params", "first"),
    ("flops_per_token", "FLOPs/token", "first"),
    ("tokens_seen", "tokens", "first"),
]
SEED_COLUMNS = [("val_loss", "val loss"), ("val_bpb", "val bpb")]
SPEED_COLUMNS = [
    ("tokens_per_second", "tokens/s", "mean"),
    ("mfu", "MFU", "mean"),
    ("peak_memory_mb", "peak MB", "mean"),
    ("decode_state_size", "decode state", "first"),
]


@dataclass
class Table:
    """The rows of the report, kept as numbers (CSV, tests) and as text (markdown, terminal)."""

    variants: list[Variant]
    comparisons: list[Comparison]
    score_keys: list[tuple[str, str]]
    published: dict[str, float]  # variant label -> a published validation loss (the recipe's)

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per variant: what report.csv holds (mean and std as separate columns)."""
        rows = []
        for variant, comparison in zip(self.variants, self.comparisons):
            row: dict[str, Any] = {
                "variant": variant.label,
                "n": len(variant.completed),
                "failed": len(variant.failed),
            }
            for key, _, _ in FIXED_COLUMNS:
                row[key] = variant.first(key)
            for key, _ in SEED_COLUMNS + self.score_keys:
                stat = variant.stat(key)
                row[f"{key}_mean"], row[f"{key}_std"] = stat.mean, stat.std
            for key, _, how in SPEED_COLUMNS:
                row[key] = variant.stat(key).mean if how == "mean" else variant.first(key)
            row["gap_vs_best"] = comparison.gap
            row["test"] = comparison.test
            row["p_value"] = comparison.p_value
            row["significant"] = comparison.verdict
            if self.published:
                row["published_val_loss"] = self.published.get(variant.label)
            rows.append(row)
        return rows

    def csv(self) -> str:
        records = self.records()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(records[0]) if records else ["variant"])
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
        return out.getvalue()

    def markdown(self) -> str:
        header = ["variant", "n"] + [title for _, title, _ in FIXED_COLUMNS]
        header += [title for _, title in SEED_COLUMNS] + [title for _, title in self.score_keys]
        header += ["Δ val loss vs best", "p", "beyond seed spread?"]
        header += [title for _, title, _ in SPEED_COLUMNS]
        if self.published:
            header.append("published val loss")
        lines = [header]
        for variant, comparison in zip(self.variants, self.comparisons):
            others = Counter(run.status for run in variant.failed)  # failed, interrupted, running …
            n = f"{len(variant.completed)}" + "".join(
                f" (+{k} {status})" for status, k in sorted(others.items())
            )
            cells = [variant.label, n]
            cells += [_count(variant.first(key)) for key, _, _ in FIXED_COLUMNS]
            cells += [_mean_std(variant.stat(key)) for key, _ in SEED_COLUMNS + self.score_keys]
            cells += [
                "—" if comparison.gap is None else f"{comparison.gap:+.4f}",
                "—" if comparison.p_value is None else f"{comparison.p_value:.3g}",
                comparison.verdict
                if comparison.test in ("best", "n/a")
                else f"{comparison.verdict} ({comparison.test})",
            ]
            speed = variant.stat("tokens_per_second").mean, variant.stat("mfu").mean
            cells += [_count(speed[0]), "—" if speed[1] is None else f"{speed[1]:.1%}"]
            cells += [_count(variant.stat("peak_memory_mb").mean), _count(variant.first("decode_state_size"))]
            if self.published:
                value = self.published.get(variant.label)
                cells.append("—" if value is None else f"{value:.4f}")
            lines.append(cells)
        return _markdown_table(lines, numeric_from=1)


def build_table(variants: list[Variant], published: dict[str, float] | None = None) -> Table:
    ranked = rank(variants)
    best = ranked[0] if ranked and ranked[0].stat(METRIC).mean is not None else None
    comparisons = [
        compare(v, best)
        if best is not None and v.stat(METRIC).mean is not None
        else Comparison("n/a", None, None)
        for v in ranked
    ]
    return Table(ranked, comparisons, eval_keys(ranked), published or {})


def _count(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e9:
        return f"{value / 1e9:.2f}B"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value:,.0f}"


def _mean_std(stat: Stat) -> str:
    if stat.mean is None:
        return "—"
    if stat.std is None:
        return f"{stat.mean:.4f}"
    return f"{stat.mean:.4f} ± {stat.std:.4f}"


def _markdown_table(lines: list[list[str]], numeric_from: int) -> str:
    widths = [max(3, *(len(row[i]) for row in lines)) for i in range(len(lines[0]))]  # a rule needs 3
    rule = ["-" * w if i < numeric_from else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    out = []
    for row in [lines[0], rule, *lines[1:]]:
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
    return "\n".join(out)

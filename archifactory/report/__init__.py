"""`archifactory report <sweep dir | run dirs…>`: a results table and plots from run directories.

Across runs: `report.md` (the table, the test used, the figures, failed runs), `report.csv` (the same
rows as numbers: mean and std in separate columns), `val_loss_vs_tokens.png`, `val_loss_vs_time.png`,
`val_loss_vs_flops.png`, and the table on stdout. One row per variant (runs that differ only in the
seed): parameters (total, non-embedding, active), FLOPs/token, tokens seen, final validation loss and
bits per byte as mean ± std over seeds (n shown), eval scores (`summary.json`'s `eval` section, from
`archifactory eval`) and probe accuracy (`val_accuracy`) when present, the gap to the best variant and
whether it exceeds the seed-to-seed spread (`report/table.py` says which test), tokens/s, MFU, peak
memory and decode-state size. A recipe's `published` figures (seed_tinystories) are printed beside ours.

Runs of different protocols or datasets (pretraining on text, SFT on chat data, a synthetic probe; see
`report/pools.py`) are never pooled or ranked together: each pool gets its own table (a `## <pool>`
section of report.md, a `pool` column in report.csv) and figures (`val_loss_vs_tokens-<pool>.png`), and
one `warning:` line says so. A repeated seed counts once (the newest run; one `warning:` line names the
runs left out). Legends sit below the axes, labels wrapped, so long variant names stay in the figure.

One run dir: `report.md` with its summary and `run.png` (losses, learning rate, tokens/s, gradient norm,
MoE expert-load imbalance). Files go to `--out` (default: the sweep dir or the run dir given; `report/`
for several run dirs).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.report.plots import X_AXES, draw_run, draw_sweep, run_panels, sweep_series
from archifactory.report.pools import Pool, pools_warning, split_pools
from archifactory.report.runs import Run, Variant, duplicate_warning, find_runs, group_variants
from archifactory.report.table import Table, build_table
from archifactory.report.table import __doc__ as TEST_DOC
from archifactory.runs import layout

USAGE = "archifactory report <sweep dir | run dir …> [--out DIR]"


def published_losses(variants: list[Variant]) -> dict[str, float]:
    """variant label -> the recipe's published validation loss for its mixin (`published.val_loss`)."""
    found = {}
    for variant in variants:
        run = variant.runs[0]
        table = (run.config.get("published") or {}).get("val_loss") or {}
        mixin = run.summary.get("mixin")
        if isinstance(table, dict) and mixin in table:
            found[variant.label] = float(table[mixin])
    return found


@dataclass
class Section:
    """One pool's part of a sweep report: its runs, table and figures."""

    pool: Pool
    table: Table
    figures: list[Path]


@dataclass
class SweepReport:
    sections: list[Section]
    warnings: list[str]  # one line each: several pools, repeated seeds

    @property
    def figures(self) -> list[Path]:
        return [figure for section in self.sections for figure in section.figures]

    def text(self) -> str:
        """The table(s) for the terminal: one, or each under its pool's title."""
        if len(self.sections) == 1:
            return self.sections[0].table.markdown()
        return "\n\n".join(f"## {s.pool.title}\n\n{s.table.markdown()}" for s in self.sections)


def sweep_report(runs: list[Run], out: Path) -> SweepReport:
    """report.md, report.csv and the figures of `runs`, one table per (protocol, dataset) pool."""
    pools = split_pools(runs)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for index, pool in enumerate(pools, start=1):
        variants = group_variants(pool.runs)
        table = build_table(variants, published_losses(variants))
        tag = f"-{pool.slug(index)}" if len(pools) > 1 else ""
        figures = []
        for axis, (_, filename) in X_AXES.items():
            series = sweep_series(table.variants, axis)
            if series:
                title = f"validation loss vs {X_AXES[axis][0]} (mean ± std over seeds)"
                path = out / filename.replace(".png", f"{tag}.png")
                figures.append(draw_sweep(series, axis, path, title))
        sections.append(Section(pool, table, figures))
    variants = [variant for section in sections for variant in section.table.variants]
    warnings = [line for line in (pools_warning(pools), duplicate_warning(variants)) if line]
    report = SweepReport(sections, warnings)
    (out / "report.csv").write_text(_csv(sections))
    (out / "report.md").write_text(_sweep_markdown(report, runs))
    return report


def _csv(sections: list[Section]) -> str:
    if len(sections) == 1:
        return sections[0].table.csv()
    records = [{"pool": s.pool.title, **record} for s in sections for record in s.table.records()]
    columns = list(dict.fromkeys(key for record in records for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if record.get(k) is None else record[k] for k in columns})
    return out.getvalue()


def _sweep_markdown(report: SweepReport, runs: list[Run]) -> str:
    several = len(report.sections) > 1
    variants = sum(len(s.table.variants) for s in report.sections)
    head = f"# Report: {len(runs)} runs, {variants} variants"
    lines = [
        head + (f" in {len(report.sections)} pools (never ranked against each other)" if several else ""),
        "",
    ]
    for section in report.sections:
        if several:
            lines += [f"## {section.pool.title}", ""]
        lines += [section.table.markdown(), ""]
        failed = [run for run in section.pool.runs if not run.completed]
        if failed:
            lines += [
                f"{'###' if several else '##'} Runs that did not complete",
                "",
            ]  # failed, interrupted, running
            for run in failed:
                error = str(run.summary.get("error") or "").splitlines()[0:1]
                lines.append(f"- `{run.path.name}`: {run.status}" + (f" — {error[0]}" if error else ""))
            lines.append("")
        for figure in section.figures:
            lines += [f"![{figure.stem}]({figure.name})", ""]
    lines.append(
        "Mean ± sample standard deviation over the completed seeds (n, each seed counted once). Final "
        "validation loss in nats/token; bpb = bits per byte of the validation text."
    )
    test = TEST_DOC.split("**Which test.**", 1)[1].strip()
    lines += ["", "**Significance.** " + " ".join(test.split()), ""]
    lines += [f"**Note.** {warning}" for warning in report.warnings]
    return "\n".join(lines) + "\n"


SINGLE_KEYS = (
    "status", "mixin", "ffn", "positional", "dataset", "seed", "params_total", "params_non_embedding",
    "params_active", "target_params", "flops_per_token", "steps", "tokens_seen", "train_loss", "val_loss",
    "val_bpb", "val_accuracy", "reward", "tokens_per_second", "mfu", "peak_memory_mb", "decode_state_size",
    "wall_seconds",
)  # fmt: skip


def run_report(run: Run, out: Path) -> tuple[str, list[Path]]:
    out.mkdir(parents=True, exist_ok=True)
    panels = run_panels(run)
    figures = [draw_run(panels, out / "run.png", run.path.name)] if panels else []
    rows = [("key", "value")] + [
        (key, _format(run.summary[key])) for key in SINGLE_KEYS if run.summary.get(key) is not None
    ]
    section = run.summary.get("eval")
    if isinstance(section, dict):
        for task, result in sorted(section.items()):
            value = result.get("value") if isinstance(result, dict) else result
            rows.append((f"eval {task}", _format(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    table = [f"| {rows[0][0].ljust(widths[0])} | {rows[0][1].ljust(widths[1])} |"]
    table.append(f"| {'-' * widths[0]} | {'-' * (widths[1] - 1)}: |")
    table += [f"| {k.ljust(widths[0])} | {v.rjust(widths[1])} |" for k, v in rows[1:]]
    text = "\n".join(table)
    body = [f"# Report: {run.path.name}", "", text, ""] + [f"![run]({f.name})" for f in figures]
    (out / "report.md").write_text("\n".join(body) + "\n")
    return text, figures


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archifactory report", usage=USAGE, description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep dir, or one or more run dirs")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/csv and the PNGs go")
    options = parser.parse_args(args)
    runs = find_runs(options.paths)
    single = len(runs) == 1 and len(options.paths) == 1 and layout.summary_path(options.paths[0]).is_file()
    if single:
        out = options.out or options.paths[0]
        text, figures = run_report(runs[0], out)
    else:
        if options.out is None and len(options.paths) == 1 and options.paths[0].is_dir():
            out = options.paths[0]
        else:
            out = options.out or Path("report")
        report = sweep_report(runs, out)
        text, figures = report.text(), report.figures
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if not any(v.completed for s in report.sections for v in s.table.variants):
            print(text)
            raise ArchiFactoryError(f"none of the {len(runs)} runs completed; see {out / 'report.md'}")
    print(text)
    print(f"\nwrote {out / 'report.md'}" + ("" if single else f", {out / 'report.csv'}"))
    for figure in figures:
        print(f"wrote {figure}")
    print(f"done: report of {len(runs)} run(s) in {out}")
    return 0

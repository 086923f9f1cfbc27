"""`archifactory report <sweep dir | run dirs…>`: a results table and plots from run directories.

Across runs: `report.md` (the table, the test used, the figures, failed runs), `report.csv` (the same
rows as numbers: mean and std in separate columns), `val_loss_vs_tokens.png`, `val_loss_vs_time.png`,
`val_loss_vs_flops.png`, and the table on stdout. One row per variant (runs that differ only in the
seed): parameters (total, non-embedding, active), FLOPs/token, tokens seen, final validation loss and
bits per byte as mean ± std over seeds (n shown), eval scores (`summary.json`'s `eval` section, from
`archifactory eval`) and probe accuracy (`val_accuracy`) when present, the gap to the best variant and
whether it exceeds the seed-to-seed spread (`report/table.py` says which test), tokens/s, MFU, peak
memory and decode-state size. A recipe's `published` figures (seed_tinystories) are printed beside ours.

One run dir: `report.md` with its summary and `run.png` (losses, learning rate, tokens/s, gradient norm,
MoE expert-load imbalance). Files go to `--out` (default: the sweep dir or the run dir given; `report/`
for several run dirs).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.report.plots import X_AXES, draw_run, draw_sweep, run_panels, sweep_series
from archifactory.report.runs import Run, Variant, find_runs, group_variants
from archifactory.report.table import Table, build_table
from archifactory.report.table import __doc__ as TEST_DOC

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


def sweep_report(runs: list[Run], out: Path) -> tuple[Table, list[Path]]:
    variants = group_variants(runs)
    table = build_table(variants, published_losses(variants))
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for axis, (_, filename) in X_AXES.items():
        series = sweep_series(table.variants, axis)
        if series:
            title = f"validation loss vs {X_AXES[axis][0]} (mean ± std over seeds)"
            figures.append(draw_sweep(series, axis, out / filename, title))
    (out / "report.csv").write_text(table.csv())
    (out / "report.md").write_text(_sweep_markdown(table, runs, figures))
    return table, figures


def _sweep_markdown(table: Table, runs: list[Run], figures: list[Path]) -> str:
    lines = [f"# Report: {len(runs)} runs, {len(table.variants)} variants", "", table.markdown(), ""]
    lines.append(
        "Mean ± sample standard deviation over the completed seeds (n). Final validation loss in "
        "nats/token; bpb = bits per byte of the validation text."
    )
    test = TEST_DOC.split("**Which test.**", 1)[1].strip()
    lines += ["", "**Significance.** " + " ".join(test.split()), ""]
    failed = [run for run in runs if not run.completed]
    if failed:
        lines += ["## Runs that did not complete", ""]  # failed, interrupted, or still running
        for run in failed:
            error = str(run.summary.get("error") or "").splitlines()[0:1]
            lines.append(f"- `{run.path.name}`: {run.status}" + (f" — {error[0]}" if error else ""))
        lines.append("")
    for figure in figures:
        lines += [f"![{figure.stem}]({figure.name})", ""]
    return "\n".join(lines)


SINGLE_KEYS = (
    "status", "mixin", "ffn", "positional", "dataset", "seed", "params_total", "params_non_embedding",
    "params_active", "target_params", "flops_per_token", "steps", "tokens_seen", "train_loss", "val_loss",
    "val_bpb", "val_accuracy", "tokens_per_second", "mfu", "peak_memory_mb", "decode_state_size", "wall_seconds",
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
    single = len(runs) == 1 and len(options.paths) == 1 and (options.paths[0] / "summary.json").is_file()
    if single:
        out = options.out or options.paths[0]
        text, figures = run_report(runs[0], out)
    else:
        if options.out is None and len(options.paths) == 1 and options.paths[0].is_dir():
            out = options.paths[0]
        else:
            out = options.out or Path("report")
        table, figures = sweep_report(runs, out)
        text = table.markdown()
        if not any(v.completed for v in table.variants):
            print(text)
            raise ArchiFactoryError(f"none of the {len(runs)} runs completed; see {out / 'report.md'}")
    print(text)
    print(f"\nwrote {out / 'report.md'}" + ("" if single else f", {out / 'report.csv'}"))
    for figure in figures:
        print(f"wrote {figure}")
    return 0

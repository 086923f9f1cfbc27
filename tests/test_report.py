"""`archifactory report`: the table's numbers are the runs' summary.json numbers (mean and std recomputed
here), failed runs show as failed, plot data has one series per variant built from metrics.jsonl, the
significance test is the documented one, optional eval/probe sections become columns when present."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from scipy import stats

from archifactory.cli.main import main
from archifactory.report import run_report, sweep_report
from archifactory.report.plots import run_panels, sweep_series
from archifactory.report.runs import find_runs, group_variants
from archifactory.report.table import build_table, compare


def make_run(
    root: Path,
    name: str,
    overrides: list[str],
    summary: dict,
    metrics: list[dict] | None = None,
    config: dict | None = None,
) -> Path:
    """A run dir as `archifactory train` writes it (only the files the report reads)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": summary.get("seed"), **(config or {})})
    )
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics or []))
    return run


# final val loss per (mixin, seed); gqa is clearly best, rnn's gap is consistent across seeds
LOSSES = {
    ("gqa", 0): 3.10,
    ("gqa", 1): 3.14,
    ("gqa", 2): 3.12,
    ("rnn", 0): 3.60,
    ("rnn", 1): 3.66,
    ("rnn", 2): 3.61,
}


def summary_for(mixin: str, seed: int, **extra) -> dict:
    loss = LOSSES[(mixin, seed)]
    return {
        "status": "completed", "mixin": mixin, "ffn": "swiglu", "positional": "rope", "dataset": "text",
        "seed": seed, "params_total": 1000 if mixin == "gqa" else 900, "params_non_embedding": 600,
        "params_active": 1000, "flops_per_token": 5000.0, "tokens_seen": 4096, "val_loss": loss,
        "val_bpb": loss / 2.1, "tokens_per_second": 100.0 + seed, "mfu": None, "peak_memory_mb": 500.0 + seed,
        "decode_state_size": 64, "wall_seconds": 10.0, **extra,
    }  # fmt: skip


def val_metrics(mixin: str, seed: int) -> list[dict]:
    final = LOSSES[(mixin, seed)]
    records = []
    for step in (10, 20, 30):
        records.append({"step": step, "tokens_seen": step * 128, "train_loss": final + 1, "lr": 1e-3 * step})
        records.append(
            {"step": step, "tokens_seen": step * 128, "elapsed_seconds": step * (1.0 + seed / 10),
             "val_loss": final + (30 - step) / 10, "val_bpb": 1.0}
        )  # fmt: skip
    return records


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    n = 0
    for mixin in ("gqa", "rnn"):
        for seed in (0, 1, 2):
            make_run(
                root, f"{n}_{mixin}_s{seed}", [f"mixin={mixin}", f"seed={seed}", "trainer=smoke"],
                summary_for(mixin, seed), val_metrics(mixin, seed),
            )  # fmt: skip
            n += 1
    make_run(
        root, f"{n}_rnn_s3", ["mixin=rnn", "seed=3", "trainer=smoke"],
        {"status": "failed", "error": "mixin=rnn: boom\ntraceback", "mixin": "rnn", "seed": 3},
    )  # fmt: skip
    return root


def test_table_numbers_are_the_summaries(sweep_dir: Path) -> None:
    report = sweep_report(find_runs([sweep_dir]), sweep_dir)
    ((table, figures),) = [(section.table, section.figures) for section in report.sections]
    rows = {row["variant"]: row for row in csv.DictReader((sweep_dir / "report.csv").open())}
    assert set(rows) == {"mixin=gqa", "mixin=rnn"}
    for mixin in ("gqa", "rnn"):
        row = rows[f"mixin={mixin}"]
        losses = [LOSSES[(mixin, s)] for s in (0, 1, 2)]
        assert int(row["n"]) == 3
        assert float(row["val_loss_mean"]) == pytest.approx(statistics.fmean(losses), abs=1e-12)
        assert float(row["val_loss_std"]) == pytest.approx(statistics.stdev(losses), abs=1e-12)
        assert float(row["val_bpb_mean"]) == pytest.approx(
            statistics.fmean(v / 2.1 for v in losses), abs=1e-12
        )
        assert float(row["tokens_per_second"]) == pytest.approx(101.0)
        assert float(row["params_total"]) == (1000 if mixin == "gqa" else 900)
    assert rows["mixin=rnn"]["failed"] == "1" and rows["mixin=gqa"]["failed"] == "0"
    assert [v.label for v in table.variants] == ["mixin=gqa", "mixin=rnn"]  # best first
    markdown = (sweep_dir / "report.md").read_text()
    assert "3 (+1 failed)" in markdown
    assert "`6_rnn_s3`: failed — mixin=rnn: boom" in markdown
    assert "paired t-test" in markdown  # the report names its test
    assert sorted(f.name for f in figures) == [
        "val_loss_vs_flops.png",
        "val_loss_vs_time.png",
        "val_loss_vs_tokens.png",
    ]
    assert all(f.stat().st_size > 1000 for f in figures)


def test_significance_is_a_paired_t_test_over_seeds(sweep_dir: Path) -> None:
    variants = {v.label: v for v in group_variants(find_runs([sweep_dir]))}
    result = compare(variants["mixin=rnn"], variants["mixin=gqa"])
    seeds = (0, 1, 2)
    expected = stats.ttest_rel([LOSSES[("rnn", s)] for s in seeds], [LOSSES[("gqa", s)] for s in seeds])
    assert result.test == "paired t"
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.gap == pytest.approx(
        statistics.fmean(LOSSES[("rnn", s)] - LOSSES[("gqa", s)] for s in seeds)
    )
    assert result.verdict == "yes"


def test_welch_without_common_seeds_and_na_with_one_seed(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, f"gqa{seed}", ["mixin=gqa", f"seed={seed}"], summary_for("gqa", seed))
    for seed in (1, 2):  # only seed 1 in common: no pairing possible
        make_run(
            root,
            f"rnn{seed}",
            ["mixin=rnn", f"seed={seed + 10}"],
            summary_for("rnn", seed) | {"seed": seed + 10},
        )
    make_run(root, "mla0", ["mixin=mla", "seed=0"], summary_for("gqa", 0) | {"mixin": "mla", "val_loss": 3.5})
    variants = {v.label: v for v in group_variants(find_runs([root]))}
    welch = compare(variants["mixin=rnn"], variants["mixin=gqa"])
    expected = stats.ttest_ind([3.66, 3.61], [3.10, 3.14], equal_var=False)
    assert welch.test == "Welch t" and welch.p_value == pytest.approx(expected.pvalue)
    single = compare(variants["mixin=mla"], variants["mixin=gqa"])
    assert single.test == "n/a" and single.verdict == "n/a" and single.gap == pytest.approx(3.5 - 3.12)


def test_plot_data_one_series_per_variant_from_metrics(sweep_dir: Path) -> None:
    variants = group_variants(find_runs([sweep_dir]))
    series = {s.label: s for s in sweep_series(variants, "tokens")}
    assert set(series) == {"mixin=gqa", "mixin=rnn"}
    gqa = series["mixin=gqa"]
    assert gqa.n == 3 and gqa.x == [1280, 2560, 3840]
    for i, step in enumerate((10, 20, 30)):
        ys = [LOSSES[("gqa", s)] + (30 - step) / 10 for s in (0, 1, 2)]
        assert gqa.y[i] == pytest.approx(statistics.fmean(ys))
        assert gqa.high[i] - gqa.y[i] == pytest.approx(statistics.stdev(ys))
    seconds = {s.label: s for s in sweep_series(variants, "seconds")}["mixin=rnn"]
    assert seconds.x == pytest.approx([step * statistics.fmean([1.0, 1.1, 1.2]) for step in (10, 20, 30)])
    flops = {s.label: s for s in sweep_series(variants, "flops")}["mixin=gqa"]
    assert flops.x == pytest.approx([3 * 5000.0 * step * 128 for step in (10, 20, 30)])


def test_eval_and_probe_scores_become_columns_when_present(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (mmlu, acc) in enumerate([(0.25, 0.5), (0.27, 0.7)]):
        extra = {"eval": {"mmlu": {"metric": "acc", "value": mmlu, "stderr": 0.01}}, "val_accuracy": acc}
        make_run(root, f"gqa{seed}", ["mixin=gqa", f"seed={seed}"], summary_for("gqa", seed, **extra))
    make_run(root, "rnn0", ["mixin=rnn", "seed=0"], summary_for("rnn", 0))  # no eval: an empty cell
    table = build_table(group_variants(find_runs([root])))
    assert table.score_keys == [("eval.mmlu.value", "mmlu acc"), ("val_accuracy", "val accuracy")]
    records = {r["variant"]: r for r in table.records()}
    assert records["mixin=gqa"]["eval.mmlu.value_mean"] == pytest.approx(0.26)
    assert records["mixin=gqa"]["val_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert records["mixin=rnn"]["eval.mmlu.value_mean"] is None
    assert "mmlu acc" in table.markdown() and "0.2600 ± 0.0141" in table.markdown()
    plain = build_table(group_variants(find_runs([tmp_path / "runs" / "rnn0"])))
    assert plain.score_keys == []  # nothing required when no run has them


def test_single_run_report_plots_its_own_curves(tmp_path: Path) -> None:
    metrics = val_metrics("gqa", 0)
    metrics[0] |= {
        "grad_norm": 1.5,
        "tokens_per_second": 900.0,
        "layers.0.imbalance": 1.2,
        "layers.1.imbalance": 1.4,
    }
    run_dir = make_run(tmp_path, "run", ["mixin=gqa"], summary_for("gqa", 0), metrics)
    (run,) = find_runs([run_dir])
    panels = run_panels(run)
    assert [s.label for s in panels["loss (nats/token)"]] == ["train loss", "validation loss"]
    assert panels["learning rate"][0].y == pytest.approx([1e-2, 2e-2, 3e-2])
    assert panels["gradient norm"][0].y == [1.5]
    assert [s.label for s in panels["expert load imbalance (max/mean)"]] == ["layers.0", "layers.1"]
    text, figures = run_report(run, run_dir)
    assert "val_loss" in text and "3.1000" in text
    assert figures == [run_dir / "run.png"] and figures[0].stat().st_size > 1000


def test_cli_report_prints_the_table_and_refuses_empty_folders(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| mixin=gqa" in out and (tmp_path / "out" / "report.csv").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.startswith("error: no run directory")


def test_document_masked_runs_are_never_pooled_with_unmasked_ones(tmp_path: Path) -> None:
    """Same overrides and mixin, one run trained with dataset.document_mask (set in a recipe, not on the
    command line): they are two variants, the masked one named so."""
    make_run(tmp_path, "a", ["seed=0"], summary_for("gqa", 0, document_mask=False))
    make_run(tmp_path, "b", ["seed=1"], summary_for("gqa", 1, document_mask=True))
    labels = sorted(v.label for v in group_variants(find_runs([tmp_path])))
    assert len(labels) == 2 and any(label.endswith("[document_mask]") for label in labels)


def test_runs_of_other_protocols_or_datasets_get_their_own_tables(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder with a text sweep, an SFT run (its loss 0.9: lower than any text run) and two MQAR probe
    runs: three pools, each its own table and figures, none ranked against another; one warning line."""
    text = {"dataset": {"name": "text", "source": "text", "path": "./corpus"}}
    for name in [p.name for p in sweep_dir.iterdir()]:
        (sweep_dir / name / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, **text}))
    chat = {"dataset": {"name": "chat_jsonl", "source": "chat", "path": "c.jsonl"}, "init_from": "/runs/pre"}
    make_run(sweep_dir, "sft", ["dataset=chat_jsonl"], summary_for("gqa", 0, val_loss=0.9), config=chat)
    probe = {"dataset": {"name": "mqar", "source": "synthetic", "task": "mqar"}}
    for mixin in ("gqa", "rnn"):
        extra = {"val_loss": 0.1 if mixin == "rnn" else 0.5, "val_accuracy": 0.9, "dataset": "mqar"}
        make_run(sweep_dir, f"probe_{mixin}", [f"mixin={mixin}", "dataset=mqar"], summary_for(mixin, 0, **extra),
                 val_metrics(mixin, 0), config=probe)  # fmt: skip
    # a probe job that failed before Hydra wrote its config: its summary's dataset puts it with the probes
    make_run(
        sweep_dir, "probe_failed", ["mixin=mla", "dataset=mqar"], {"status": "failed", "dataset": "mqar"}
    )
    out = tmp_path / "out"
    assert main(["report", str(sweep_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 protocols/datasets" in warnings[0]
    assert "pretrain on text path=./corpus (7 runs)" in warnings[0] and "sft on chat_jsonl" in warnings[0]
    report = sweep_report(find_runs([sweep_dir]), tmp_path / "again")
    titles = [section.pool.title for section in report.sections]
    assert titles == ["pretrain on text path=./corpus", "sft on chat_jsonl path=c.jsonl", "probe on mqar"]
    pretrain, sft, probe_section = (section.table for section in report.sections)
    assert [v.label for v in pretrain.variants] == ["mixin=gqa", "mixin=rnn"]  # the SFT run is not "best"
    assert [v.label for v in sft.variants] == ["gqa swiglu rope"] and sft.comparisons[0].verdict == "best"
    assert [v.label for v in probe_section.variants] == ["mixin=rnn", "mixin=gqa", "mixin=mla"]
    assert len(report.sections[0].pool.runs) == 7 and len(report.sections[2].pool.runs) == 3
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["pool"], r["variant"]) for r in rows][:3] == [
        ("pretrain on text path=./corpus", "mixin=gqa"), ("pretrain on text path=./corpus", "mixin=rnn"),
        ("sft on chat_jsonl path=c.jsonl", "gqa swiglu rope"),
    ]  # fmt: skip
    markdown = (out / "report.md").read_text()
    assert "## probe on mqar" in markdown and "## sft on chat_jsonl path=c.jsonl" in markdown
    assert (out / "val_loss_vs_tokens-1-pretrain-text.png").is_file()
    assert (out / "val_loss_vs_tokens-3-probe-mqar.png").is_file()
    assert "## pretrain on text" in captured.out and "## probe on mqar" in captured.out


def test_a_repeated_seed_counts_once_and_the_newest_run_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two seed-0 runs (a rerun) and one seed-1 run of gqa, beside rnn: gqa has n=2, not 3; its mean uses
    the newer seed-0 run; one warning line names the run left out."""
    import os

    old = make_run(tmp_path, "gqa_s0_old", ["mixin=gqa", "seed=0"], summary_for("gqa", 0, val_loss=9.0))
    os.utime(old / "summary.json", (1_000_000, 1_000_000))  # written long before the rerun
    make_run(tmp_path, "gqa_s0_new", ["mixin=gqa", "seed=0"], summary_for("gqa", 0))
    make_run(tmp_path, "gqa_s1", ["mixin=gqa", "seed=1"], summary_for("gqa", 1))
    make_run(tmp_path, "rnn_s0", ["mixin=rnn", "seed=0"], summary_for("rnn", 0))
    variants = {v.label: v for v in group_variants(find_runs([tmp_path]))}
    gqa = variants["mixin=gqa"]
    assert gqa.stat("val_loss").values == [LOSSES[("gqa", 0)], LOSSES[("gqa", 1)]]
    assert [(a.path.name, b.path.name) for a, b in gqa.duplicates] == [("gqa_s0_old", "gqa_s0_new")]
    records = {r["variant"]: r for r in build_table(list(variants.values())).records()}
    assert records["mixin=gqa"]["n"] == 2 and records["mixin=rnn"]["n"] == 1
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "gqa_s0_old" in warnings[0] and "kept gqa_s0_new" in warnings[0]
    alone = tmp_path / "alone"  # the same three runs with no other variant: still one variant, n=2
    alone.mkdir()
    for name in ("gqa_s0_old", "gqa_s0_new", "gqa_s1"):
        (tmp_path / name).rename(alone / name)
    os.utime(alone / "gqa_s0_old" / "summary.json", (1_000_000, 1_000_000))
    (variant,) = group_variants(find_runs([alone]))
    assert len(variant.runs) == 2 and len(variant.duplicates) == 1


def test_long_labels_keep_the_legend_inside_the_figure(tmp_path: Path) -> None:
    """Eight variants with 90-character labels: the legend (below the axes, labels wrapped) lies within
    the figure's bounding box, and the PNG is written."""
    from archifactory.report.plots import Series, draw_sweep, sweep_figure

    series = [
        Series(f"mixin=gated_deltanet ffn=moe ffn.num_experts={k} ffn.top_k=2 model.target_params=50M v{k}",
               [1.0, 2.0, 3.0], [3.0, 2.5, 2.0 + k / 10], [2.9, 2.4, 1.9], [3.1, 2.6, 2.1], 3)
        for k in range(8)
    ]  # fmt: skip
    figure = sweep_figure(series, "tokens", "validation loss vs tokens seen (mean ± std over seeds)")
    figure.canvas.draw()
    (legend,) = figure.legends
    box, frame = legend.get_window_extent(), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for ax in figure.axes:  # and it does not cover the panels
        assert not box.overlaps(ax.get_window_extent())
    assert len(legend.get_texts()) == 8 and "\n" in legend.get_texts()[0].get_text()
    path = draw_sweep(series, "tokens", tmp_path / "long.png", "validation loss vs tokens seen")
    assert path.stat().st_size > 1000

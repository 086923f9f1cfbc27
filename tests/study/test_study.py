"""`archifactory study` end to end on a tiny sweep already trained (`study.from=`): killed in the middle and
rerun, it finishes only the rest; the report's rows are the per-run eval JSON and summary values, with
mean ± std over seeds; a failing stage is recorded and the other variants go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archifactory.runs import layout
from archifactory.study.run import parse_study_args, report_rows
from tests.run_helpers import train_tiny_run, write_small_corpus

pytestmark = pytest.mark.slow
RUNS = [("gqa", 0), ("gqa", 1), ("rwkv6", 0)]
QA = [("what is red", "apple"), ("who sang", "bird"), ("where sat", "mat")]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    corpus, cache = write_small_corpus(root / "corpus"), root / "cache"
    for mixin, seed in RUNS:
        name = f"{mixin}_s{seed}"
        train_tiny_run(root / "sweep" / name, corpus, cache, f"mixin={mixin}", f"seed={seed}")
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for _ in range(20)
        for q, a in QA
    ]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return root


def study_args(root: Path, evals: str = "perplexity") -> list[str]:
    sft_args = f"dataset.path={root / 'chat.jsonl'} dataset.cache_dir={root / 'cache'} trainer.max_steps=6"
    return [
        f"study.from={root / 'sweep'}",
        f"study.dir={root / 'out'}",
        "study.sft=chat_jsonl",
        f"study.sft_args={sft_args} trainer.seq_len=48 trainer.eval_every=6",
        "study.grpo=arith",
        "study.grpo_args=trainer.max_steps=2 trainer.checkpoint_every=2 grpo.num_generations=2 "
        "grpo.prompts_per_step=2 grpo.max_completion_length=3 dataset.max_problems=20",
        f"study.eval={evals}",
    ]


def run_study(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "archifactory", "study", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_killed_study_finishes_only_the_rest_and_reports_the_eval_values(sweep: Path) -> None:
    args, out = study_args(sweep), sweep / "out"
    first = run_study(args)
    done_first = sweep / "sweep" / "gqa_s0" / "eval" / "perplexity.json"
    deadline = time.time() + 240
    while not (out / "sft" / "gqa_s0" / layout.SUMMARY).is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # mid-way: gqa_s0 evaluated, its SFT under way, nothing else done
    first.wait()
    assert done_first.is_file() and not (out / "report.md").exists()
    stamp = done_first.stat().st_mtime_ns

    second = run_study(args)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-2000:]
    assert done_first.stat().st_mtime_ns == stamp  # the evaluation that had finished was not redone
    log = (out / "study.log").read_text()
    assert log.count(f"run={(sweep / 'sweep' / 'gqa_s0').resolve()}") == 1  # evaluated once over both runs

    rows = {row["variant"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"mixin=gqa", "mixin=rwkv6"} and rows["mixin=gqa"]["seeds"] == ["0", "1"]
    for mixin, seed in RUNS:
        row, name = rows[f"mixin={mixin}"], f"{mixin}_s{seed}"
        stages = (
            ("pretrain", sweep / "sweep" / name),
            ("sft", out / "sft" / name),
            ("grpo", out / "grpo" / name),
        )
        for stage, run_dir in stages:
            evaluated = json.loads((run_dir / "eval" / "perplexity.json").read_text())
            assert row[f"{stage} perplexity"]["values"][str(seed)] == evaluated["value"]
        summaries = [json.loads((d / layout.SUMMARY).read_text()) for _, d in stages]
        assert row["pretrain val_bpb"]["values"][str(seed)] == summaries[0]["val_bpb"]
        assert row["sft val_loss"]["values"][str(seed)] == summaries[1]["val_loss"]
        assert row["grpo reward"]["values"][str(seed)] == summaries[2]["reward"]
        assert summaries[1]["seed"] == summaries[2]["seed"] == seed  # post-training keeps each run's seed
        assert summaries[2]["init_from"] == str((out / "sft" / name).resolve())  # GRPO starts from the SFT
    gqa = rows["mixin=gqa"]["pretrain val_bpb"]
    values = list(gqa["values"].values())
    assert gqa["mean"] == pytest.approx(sum(values) / 2)
    assert gqa["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert "pretrain val_bpb vs best" in (out / "report.md").read_text()
    rebuilt = report_rows(parse_study_args(args), sorted((sweep / "sweep").iterdir()))
    assert json.loads(json.dumps(rebuilt)) == list(rows.values())  # report.json is the report of the runs


def test_a_failing_stage_is_recorded_and_the_others_go_on(sweep: Path) -> None:
    args = [*study_args(sweep, "perplexity"), f"study.dir={sweep / 'broken'}"]
    args = [a for a in args if not a.startswith("study.sft_args")]  # chat_jsonl without its file fails
    done = run_study([*args, "study.sft_args=dataset.path=/nonexistent/chat.jsonl"])
    _, stderr = done.communicate(timeout=600)
    assert done.returncode == 1
    failed = json.loads((sweep / "broken" / "study.json").read_text())["failed"]
    assert set(failed) == {name for name in (f"{m}_s{s}" for m, s in RUNS)}
    assert all(entry["stage"] == "sft" and entry["error"] for entry in failed.values())
    assert (sweep / "broken" / "report.md").is_file()  # the pretrain columns are reported all the same


def test_unknown_study_key_is_one_line() -> None:
    from archifactory.core.errors import ArchiFactoryError

    with pytest.raises(ArchiFactoryError, match="unknown study option"):
        parse_study_args(["study.dir=x", "study.evals=mmlu"])
    with pytest.raises(ArchiFactoryError, match="study.dir"):
        parse_study_args(["mixin=gqa"])

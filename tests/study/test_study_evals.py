"""`archifactory study` with the seed_protocol_cpu evaluations — perplexity, a local multiple-choice task
(`word_order`, lm-eval from `eval.include_path`) and zero-shot MQAR — on one tiny trained run: the report
has a column per evaluation and each cell is the run's `eval/<name>.json` value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archifactory.eval.mc_task import write_word_order_task
from tests.run_helpers import train_tiny_run, write_small_corpus
from tests.study.test_study import run_study

pytestmark = pytest.mark.slow
EVALS = ("perplexity", "word_order", "mqar")


def test_report_columns_are_the_eval_json_values_of_every_eval(tmp_path: Path) -> None:
    corpus, cache = write_small_corpus(tmp_path / "corpus"), tmp_path / "cache"
    train_tiny_run(tmp_path / "sweep" / "gqa_s0", corpus, cache, "mixin=gqa", "seed=0")
    lines = [f"the {w} sat on the mat and {w} sang to the king" for w in "cat dog bird red tree".split()]
    (tmp_path / "lines.txt").write_text("\n".join(lines * 4))
    write_word_order_task([tmp_path / "lines.txt"], tmp_path / "tasks", count=6, name="word_order")
    args = [
        f"study.from={tmp_path / 'sweep'}",
        f"study.dir={tmp_path / 'out'}",
        f"study.eval={','.join(EVALS)}",
        f"study.eval_args=eval.include_path={tmp_path / 'tasks'} eval.mqar_examples=8 eval.mqar_seq_len=32 "
        "eval.max_tokens=1024 eval.show_progress=false",
    ]
    done = run_study(args)
    _, stderr = done.communicate(timeout=600)
    assert done.returncode == 0, stderr[-2000:]
    (row,) = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    header = (tmp_path / "out" / "report.md").read_text().splitlines()[0]
    for name in EVALS:
        evaluated = json.loads((tmp_path / "sweep" / "gqa_s0" / "eval" / f"{name}.json").read_text())
        assert row[f"pretrain {name}"]["values"] == {"0": evaluated["value"]}
        assert f"pretrain {name}" in header
    mqar = json.loads((tmp_path / "sweep" / "gqa_s0" / "eval" / "mqar.json").read_text())
    assert (mqar["metric"], mqar["results"]["examples"], mqar["results"]["seq_len"]) == (
        "acc_among_values",
        8,
        32,
    )

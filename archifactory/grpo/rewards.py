"""Reward functions (TRL's names: `grpo.reward_funcs=[answer,format] grpo.reward_weights=[1.0,0.2]`): each
scores a batch of completions against their problems, in [0, 1]; a completion's reward is the weighted sum.

- `answer`: the final answer (after `</think>` when there is one; a `\\boxed{…}` or else the last number)
  equals the problem's answer — checked with `math-verify` when it is installed (symbolic equivalence,
  as in TRL's and Open-R1's accuracy reward), else by exact number or normalised text match.
- `format`: the completion is `<think>…</think>` followed by a non-empty answer (the SFT chat template's
  reasoning format, DeepSeek-R1's format reward).
- `countdown`: the answer is an arithmetic expression over the given numbers (each at most once) equal to
  the target (TinyZero's Countdown reward).
- `unit_test`: the completion (its code) followed by the problem's answer (its tests) runs to the end in
  the HumanEval sandbox (`archifactory.eval.sandbox`): 1 passed, 0 otherwise.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.template import END, THINK_CLOSE, THINK_OPEN
from archifactory.data.rl import Problem
from archifactory.eval.humaneval import ExecutionSettings, make_sandbox
from archifactory.eval.sandbox import Sandbox

RewardFn = Callable[[Sequence[str], Sequence[Problem], "RewardContext"], list[float]]
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


class RewardContext:
    """What a reward may need beyond the completions: the code sandbox, made on first use."""

    def __init__(self, sandbox: str = "auto", allow_unsandboxed: bool = False, timeout: float = 5.0) -> None:
        self.settings = ExecutionSettings(
            sandbox=sandbox, allow_unsandboxed=allow_unsandboxed, timeout=timeout
        )
        self._sandbox: Sandbox | None = None

    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = make_sandbox(self.settings)
        return self._sandbox


def final_answer(completion: str) -> str:
    """The answer part of a completion: after the last `</think>`, without the end-of-turn marker."""
    text = completion.replace(END, "")
    return text.rsplit(THINK_CLOSE, 1)[-1].strip()


def extract_answer(text: str) -> str | None:
    """`\\boxed{…}`'s content, else the last number, else None."""
    boxed = text.rfind("\\boxed{")
    if boxed >= 0:
        depth, start = 0, boxed + len("\\boxed{")
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                return text[start:i].strip()
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip().rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, gold: str) -> bool:
    """Equal as numbers, as math (math-verify, when installed) or as normalised text."""
    left, right = _as_number(predicted), _as_number(gold)
    if left is not None and right is not None:
        return left == right
    try:
        from math_verify import parse, verify
    except ImportError:
        return " ".join(predicted.lower().split()) == " ".join(gold.lower().split())
    return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))


def answer_reward(completions: Sequence[str], problems: Sequence[Problem], _: RewardContext) -> list[float]:
    scores = []
    for completion, problem in zip(completions, problems):
        predicted = extract_answer(final_answer(completion))
        gold = extract_answer(problem.answer) or problem.answer.strip()
        scores.append(float(predicted is not None and answers_match(predicted, gold)))
    return scores


FORMAT = re.compile(rf"^\s*{re.escape(THINK_OPEN)}.*?{re.escape(THINK_CLOSE)}\s*\S", re.S)


def format_reward(completions: Sequence[str], problems: Sequence[Problem], _: RewardContext) -> list[float]:
    return [float(bool(FORMAT.match(completion.replace(END, "")))) for completion in completions]


COUNTDOWN_EXPRESSION = re.compile(r"^[\d+\-*()\s]+$")


def countdown_reward(
    completions: Sequence[str], problems: Sequence[Problem], _: RewardContext
) -> list[float]:
    scores = []
    for completion, problem in zip(completions, problems):
        expression = final_answer(completion).split("=")[0].strip()
        ok = bool(COUNTDOWN_EXPRESSION.match(expression))
        if ok:
            used = Counter(int(n) for n in re.findall(r"\d+", expression))
            ok = not used - Counter(int(n) for n in problem.info.get("numbers", []))
        if ok:
            try:
                ok = eval(expression, {"__builtins__": {}}) == int(problem.answer)  # digits, + - * ( ) only
            except (SyntaxError, ArithmeticError, ValueError):
                ok = False
        scores.append(float(ok))
    return scores


FENCE = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)


def unit_test_reward(
    completions: Sequence[str], problems: Sequence[Problem], ctx: RewardContext
) -> list[float]:
    sandbox = ctx.sandbox()
    scores = []
    for completion, problem in zip(completions, problems):
        answer = final_answer(completion)
        fenced = FENCE.search(answer)
        code = fenced.group(1) if fenced else answer
        scores.append(float(sandbox.run(f"{code}\n\n{problem.answer}\n").outcome == "passed"))
    return scores


REWARDS: dict[str, RewardFn] = {
    "answer": answer_reward,
    "format": format_reward,
    "countdown": countdown_reward,
    "unit_test": unit_test_reward,
}


def check_rewards(names: list[str], weights: list[float] | None = None) -> dict[str, float]:
    """`grpo.reward_funcs` / `grpo.reward_weights` (TRL's names) as {name: weight}; an unknown name or a
    weight count that differs is one line."""
    if not names:
        raise ArchiFactoryError(f"grpo.reward_funcs is empty; give at least one of: {', '.join(REWARDS)}")
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ArchiFactoryError(
            f"unknown reward {unknown[0]!r} in grpo.reward_funcs; choose among: {', '.join(REWARDS)} "
            "(e.g. grpo.reward_funcs=[answer,format] grpo.reward_weights=[1.0,0.2])"
        )
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ArchiFactoryError(
            f"grpo.reward_weights has {len(weights)} weights for {len(names)} reward_funcs; give one per function"
        )
    return dict(zip(names, weights))


def score(
    weights: dict[str, float], completions: Sequence[str], problems: Sequence[Problem], ctx: RewardContext
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each reward function's scores)."""
    parts = {name: REWARDS[name](completions, problems, ctx) for name in weights}
    total = [sum(weights[name] * parts[name][i] for name in weights) for i in range(len(completions))]
    return total, parts

"""Synthetic RL problems, generated offline from a seed: integer arithmetic and Countdown.

The difficulty knobs: `num_terms` operands (arith) or `num_numbers` numbers (countdown), each drawn from
1..`max_value`, with operators drawn from `operators`. The same seed gives the same problems in the same
order on every machine (Python's `random.Random`, never the global RNG).
"""

from __future__ import annotations

import random

from archifactory.core.errors import ArchiFactoryError

OPERATORS = "+-*"


def _check_knobs(count: int, terms: int, max_value: int, operators: str) -> None:
    if count < 1 or terms < 2 or max_value < 1:
        raise ArchiFactoryError(
            f"synthetic RL data needs max_problems >= 1, at least 2 operands and max_value >= 1 "
            f"(got {count}, {terms}, {max_value})"
        )
    if not operators or set(operators) - set(OPERATORS):
        raise ArchiFactoryError(f"dataset.operators={operators!r}: use a non-empty subset of {OPERATORS!r}")


def arith_problems(
    count: int, num_terms: int, max_value: int, operators: str, seed: int
) -> list[tuple[str, str]]:
    """`count` (prompt, answer) pairs such as ("What is 7-2*3?", "1"), evaluated with the usual precedence."""
    _check_knobs(count, num_terms, max_value, operators)
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        expression = str(rng.randint(1, max_value))
        for _ in range(num_terms - 1):
            expression += rng.choice(operators) + str(rng.randint(1, max_value))
        rows.append(
            (f"What is {expression}?", str(eval(expression, {"__builtins__": {}})))
        )  # digits and +-* only
    return rows


def countdown_problems(
    count: int, num_numbers: int, max_value: int, operators: str, seed: int
) -> list[tuple[str, int, list[int]]]:
    """`count` (prompt, target, numbers): the target is reached by some expression over all the numbers, so
    every problem is solvable."""
    _check_knobs(count, num_numbers, max_value, operators)
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        numbers = [rng.randint(1, max_value) for _ in range(num_numbers)]
        order = rng.sample(numbers, len(numbers))
        expression = str(order[0])
        for value in order[1:]:
            expression += rng.choice(operators) + str(value)
        target = eval(expression, {"__builtins__": {}})  # digits and +-* only
        prompt = f"Using the numbers {numbers}, each at most once, with {' '.join(operators)}, make {target}."
        rows.append((prompt, target, numbers))
    return rows

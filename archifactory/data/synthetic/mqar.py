"""Multi-query associative recall (MQAR): Arora, Eyuboglu et al., *Zoology: Measuring and Improving
Recall in Efficient Language Models*, 2023.

One example of length `seq_len`:

    k1 v1 k2 v2 … kP vP | filler … k3 filler … k1 filler …
    └──── context ─────┘   queries: each key once, at a power-law distance

Keys come from `[1, vocab/2)` and values from `[vocab/2, vocab)` (disjoint halves; token 0 is the empty
slot). The P keys of one example are distinct, and so are its P values. After the context, the remaining
`seq_len − 2P` positions form `(seq_len − 2P) / 2` even-aligned slots; each key is queried exactly once,
at slot g drawn without replacement with probability ∝ a·(g+1)^(a−1) (`power_a` = a; a → 0 puts queries
near the context, a = 1 is uniform) — the gap distribution of repeated bigrams in real text. The target at
a query position is the value bound to that key; every other target is ignored (-100). With
`random_non_queries` the empty slots hold uniform random tokens from the whole vocabulary instead of 0,
as in Zoology's default.

This follows Zoology's `multiquery_ar` generator (same vocabulary split, gap law and target placement);
the code is ours and draws one example at a time from its own generator, so a stream of examples is
independent of the batch size and the number of ranks.
"""

from __future__ import annotations

import numpy as np

from archifactory.core.errors import ArchiFactoryError

IGNORE = -100


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float) -> None:
    """Refuse option combinations that cannot make an example, with one line naming the fix."""
    if seq_len % 2:
        raise ArchiFactoryError(f"mqar needs an even trainer.seq_len (got {seq_len})")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ArchiFactoryError(
            f"mqar needs 1 <= dataset.num_kv_pairs <= seq_len / 4 (context plus one query slot per key); "
            f"got {num_kv_pairs} pairs at trainer.seq_len={seq_len}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ArchiFactoryError(
            f"mqar draws {num_kv_pairs} distinct keys from [1, vocab_size/2): raise dataset.vocab_size "
            f"(got {vocab_size})"
        )
    if not 0 < power_a <= 1:
        raise ArchiFactoryError(f"mqar needs 0 < dataset.power_a <= 1 (got {power_a})")


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """P(query slot g) ∝ a·(g+1)^(a−1) for g in [0, space): Zoology's power law."""
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


def mqar_example(
    rng: np.random.Generator,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int64 [seq_len] each; targets[t] is the answer expected at position t."""
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
    context = 2 * num_kv_pairs
    inputs = np.zeros(seq_len, dtype=np.int64)
    inputs[0:context:2] = keys
    inputs[1:context:2] = values
    space = (seq_len - context) // 2
    slots = rng.choice(space, size=num_kv_pairs, replace=False, p=gap_probabilities(space, power_a))
    query_positions = context + 2 * slots
    inputs[query_positions] = keys
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    targets[query_positions] = values  # the next token after the query key is its value
    if random_non_queries:
        empty = inputs == 0
        inputs[empty] = rng.integers(0, vocab_size, size=int(empty.sum()))
    return inputs, targets

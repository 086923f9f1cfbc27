"""The MAD synthetic tasks: Poli et al., *Mechanistic Design and Scaling of Hybrid Architectures*, 2024.

Six token-manipulation tasks whose scores rank architectures as their scaling laws later do. Each
generator draws one example from `rng` and returns `(inputs, targets)`, int64 [seq_len] each, where
`targets[t]` is the token the model must produce at position t (-100: ignored). Definitions and defaults
follow the paper and its public code (athms/mad-lab, `mad/data/instances.py`, `configs/tasks/*.yml`);
the code is ours.

- `in_context_recall` (vocab 16, length 128): a sequence of key-value pairs (keys from the first half of
  the vocabulary, values from the second); a key keeps its value within the sequence; the last pair
  repeats an earlier key. Answers: the value of every key seen before (MAD's multi-query setting).
- `noisy_in_context_recall` (vocab 32 of which 16 noise tokens, 20% noise): as above, with pairs replaced
  by two noise tokens at rate `frac_noise`.
- `fuzzy_in_context_recall` (vocab 16, keys and values of 1–3 tokens): keys and values are motifs of
  distinct tokens; validation always queries keys of the full `k_motif_size`. The sequence is left-padded.
- `selective_copying` (vocab 16, length 256, 16 tokens): tokens to copy scattered among blanks, then a copy
  token; the answers are the tokens in order, at the blanks after it.
- `compression` (vocab 16): random tokens then a compression token; the model must then reproduce them.
  MAD scores this with an encoder that keeps only the final state and an MLP decoder; a causal LM has no
  such decoder, so here the compression token is repeated and every repeat must emit the next original
  token. For fixed-state mixers the state is the bottleneck, as in MAD; attention can look back, which
  MAD's autoencoder does not allow, so this variant is easier for attention than the paper's.
- `memorization` (vocab 256, length 32): a fixed key→value map (seeded once per run) is never shown in the
  input; each key is followed by an insert token at which its value must be produced (facts in weights).

Training targets follow MAD: the recall tasks train on every next token (`train=True`), validation scores
only the answers; the other tasks train and score on their answers.
"""

from __future__ import annotations

import numpy as np

from archifactory.core.errors import ArchiFactoryError

IGNORE = -100


def _shifted(tokens: list[int], answers: list[bool], train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets for a token sequence: all of them (train) or only the answer tokens."""
    inputs = np.asarray(tokens, dtype=np.int64)
    nxt = np.append(inputs[1:], IGNORE)
    if train:
        return inputs, nxt
    keep = np.append(np.asarray(answers[1:], dtype=bool), False)
    return inputs, np.where(keep, nxt, IGNORE)


def in_context_recall(
    rng: np.random.Generator,
    seq_len: int,
    vocab_size: int,
    train: bool,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`seq_len / 2` slots: key-value pairs (or, at rate `frac_noise`, two noise tokens); the last pair
    queries a key already shown. Noise tokens are the top `noise_vocab_size` ids."""
    content = vocab_size - noise_vocab_size
    key_vocab, value_vocab = np.arange(content // 2), np.arange(content // 2, content)
    noise_vocab = np.arange(content, vocab_size)
    pairs = seq_len // 2
    guaranteed = int(rng.integers(pairs - 1))  # at least one real pair before the final query
    bound: dict[int, int] = {}
    tokens: list[int] = []
    answers: list[bool] = []
    for slot in range(pairs - 1):
        if frac_noise > 0 and slot != guaranteed and rng.random() < frac_noise:
            tokens += rng.choice(noise_vocab, size=2).tolist()
            answers += [False, False]
            continue
        key = int(rng.choice(key_vocab))
        seen = key in bound
        if not seen:
            bound[key] = int(rng.choice(value_vocab))
        tokens += [key, bound[key]]
        answers += [False, seen]
    query = int(rng.choice(sorted(bound)))
    tokens += [query, bound[query]]
    answers += [False, True]
    return _shifted(tokens, answers, train)


def fuzzy_in_context_recall(
    rng: np.random.Generator,
    seq_len: int,
    vocab_size: int,
    train: bool,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Recall with keys and values of 1..motif-size distinct tokens; left-padded with token vocab-1."""
    pad = vocab_size - 1
    content = vocab_size - 1
    key_vocab, value_vocab = np.arange(content // 2), np.arange(content // 2, content)

    def motif(vocab: np.ndarray, size: int) -> tuple[int, ...]:
        return tuple(rng.choice(vocab, size=size, replace=False).tolist())

    def key_size() -> int:
        return int(rng.integers(1, k_motif_size + 1)) if train else k_motif_size

    probe_key = motif(key_vocab, key_size())
    probe_value = motif(value_vocab, int(rng.integers(1, v_motif_size + 1)))
    probe_len = len(probe_key) + len(probe_value)
    limit = seq_len - probe_len - (k_motif_size + v_motif_size)  # room for the final query
    # MAD draws the probe's slot from [0, seq_len - 2·probe); drawing it below `limit` guarantees the
    # queried key is shown before the query.
    probe_at = int(rng.integers(max(limit, 1)))
    bound: dict[tuple[int, ...], tuple[int, ...]] = {}
    tokens: list[int] = []
    answers: list[bool] = []
    while len(tokens) < limit:
        if len(tokens) >= probe_at and probe_key not in bound:
            key, value, seen = probe_key, probe_value, False
        else:
            key = motif(key_vocab, key_size())
            seen = key in bound
            if key == probe_key:
                value = probe_value
            elif seen:
                value = bound[key]
            else:
                value = motif(value_vocab, int(rng.integers(1, v_motif_size + 1)))
        bound[key] = value
        tokens += [*key, *value]
        answers += [False] * len(key) + [seen] * len(value)
    tokens += [*probe_key, *probe_value]
    answers += [False] * len(probe_key) + [True] * len(probe_value)
    padding = seq_len - len(tokens)
    return _shifted([pad] * padding + tokens, [False] * padding + answers, train)


def selective_copying(
    rng: np.random.Generator, seq_len: int, vocab_size: int, num_tokens_to_copy: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """`num_tokens_to_copy` tokens scattered among blanks (vocab-2), a copy token (vocab-1), then blanks
    at which the tokens must come out in order."""
    copy_token, blank = vocab_size - 1, vocab_size - 2
    n = num_tokens_to_copy
    blanks = seq_len - 2 * n - 1
    to_copy = rng.integers(0, vocab_size - 2, size=n)
    # MAD inserts each blank before a uniformly chosen token: the blank run before token j is multinomial.
    before = rng.multinomial(blanks, np.full(n, 1.0 / n))
    tokens: list[int] = []
    for count, token in zip(before.tolist(), to_copy.tolist(), strict=True):
        tokens += [blank] * count + [token]
    tokens += [copy_token] + [blank] * n
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    targets[seq_len - n :] = (
        to_copy  # MAD's targets are not shifted: blank i after the copy token emits token i
    )
    return np.asarray(tokens, dtype=np.int64), targets


def compression(rng: np.random.Generator, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`seq_len / 2` random tokens, then the compression token (vocab-1) repeated; at the k-th compression
    token the model must emit the k-th original token."""
    n = seq_len // 2
    content = rng.integers(0, vocab_size - 1, size=n)
    inputs = np.concatenate([content, np.full(seq_len - n, vocab_size - 1)]).astype(np.int64)
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    targets[n : 2 * n] = content
    return inputs, targets


def memorization_map(vocab_size: int, seed: int) -> np.ndarray:
    """The fixed key→value table: value_of[key] for keys [0, (vocab-1)/2), values from the rest."""
    rng = np.random.default_rng([seed, 0x3E3])
    content = vocab_size - 1
    keys = np.arange(content // 2)
    values = rng.permutation(np.arange(content // 2, content))[: len(keys)]
    return values


def memorization(
    rng: np.random.Generator, seq_len: int, vocab_size: int, value_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`seq_len / 2` (key, insert token) pairs; at each insert token (vocab-1) the key's fixed value."""
    keys = rng.integers(0, len(value_of), size=seq_len // 2)
    inputs = np.full(seq_len, vocab_size - 1, dtype=np.int64)
    inputs[0::2][: len(keys)] = keys
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    targets[1::2][: len(keys)] = value_of[keys]
    return inputs, targets


MAD_TASKS = (
    "in_context_recall",
    "noisy_in_context_recall",
    "fuzzy_in_context_recall",
    "selective_copying",
    "compression",
    "memorization",
)


def check_mad(task: str, seq_len: int, vocab_size: int, noise_vocab_size: int, frac_noise: float,
              k_motif_size: int, v_motif_size: int, num_tokens_to_copy: int) -> None:  # fmt: skip
    """Refuse settings that cannot make an example, with one line naming the option."""
    if task not in MAD_TASKS:
        raise ArchiFactoryError(f"unknown MAD task {task!r}; choose one of: {', '.join(MAD_TASKS)}")
    if seq_len % 2:
        raise ArchiFactoryError(f"MAD tasks need an even trainer.seq_len (got {seq_len})")
    recall = task.endswith("in_context_recall")
    if recall and seq_len < 4:
        raise ArchiFactoryError(f"{task} needs trainer.seq_len >= 4 (got {seq_len})")
    if task == "noisy_in_context_recall" and not (noise_vocab_size > 0 and 0 <= frac_noise < 1):
        raise ArchiFactoryError(f"{task} needs dataset.noise_vocab_size > 0 and 0 <= dataset.frac_noise < 1")
    content = vocab_size - (noise_vocab_size if task == "noisy_in_context_recall" else 0)
    if recall and content < 4:
        raise ArchiFactoryError(f"{task} needs at least 4 key/value tokens: raise dataset.vocab_size")
    if task == "fuzzy_in_context_recall":
        half = (vocab_size - 1) // 2
        if min(k_motif_size, v_motif_size) < 1 or max(k_motif_size, v_motif_size) > half:
            raise ArchiFactoryError(f"{task} needs 1 <= motif sizes <= (vocab_size - 1) / 2 = {half}")
        if seq_len < 3 * (k_motif_size + v_motif_size):
            raise ArchiFactoryError(f"{task} needs trainer.seq_len >= 3 x (k_motif_size + v_motif_size)")
    if task == "selective_copying" and not 1 <= num_tokens_to_copy < (seq_len - 1) / 2:
        raise ArchiFactoryError(f"{task} needs 1 <= dataset.num_tokens_to_copy < (seq_len - 1) / 2")
    if task in ("selective_copying", "compression", "memorization") and vocab_size < 4:
        raise ArchiFactoryError(f"{task} needs dataset.vocab_size >= 4")

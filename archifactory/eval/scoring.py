"""Batched log-likelihood of token continuations: the compute core of the lm-eval adapter.

`score_continuations(model, pairs, …)` returns, for each `(context_ids, continuation_ids)` pair, the sum
of log-softmax over the continuation tokens and whether greedy decoding would have produced them.

How it stays fast and exact:
- **One forward per distinct input.** A request's input is `(context + continuation)[:-1]`; requests whose
  input is a prefix of another's (the four one-token answers of a multiple-choice question, or a shorter
  answer inside a longer one) are read off the longer row, since the model is causal. This generalises
  lm-eval's "group by context" trick for one-token continuations.
- **Logits only where scored.** The model's `backbone` gives hidden states; only the continuation
  positions go through the LM head and an fp32 log-softmax (`[N, V]` for N scored tokens, not `[B, T, V]`).
- **Length-sorted batches, right-padded.** Rows are sorted longest first (little padding, and an
  out-of-memory error shows up on the first batch); right padding cannot change a causal model's earlier
  positions.
- **Left truncation, counted.** An input longer than `max_length` keeps its last `max_length` tokens
  (the continuation is never cut); `ScoreStats.truncated` counts those requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.stack import StackedMixinForCausalLM

TokenPair = tuple[Sequence[int], Sequence[int]]
# LM-head rows handled at once: bounds the fp32 [N, V] logits of one batch.
HEAD_CHUNK = 4096


@dataclass
class ScoreStats:
    """What a scoring call did, for the results file: requests, forward rows, left-truncated requests."""

    requests: int = 0
    rows: int = 0
    truncated: int = 0

    def add(self, other: ScoreStats) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.truncated += other.truncated


def _merge_prefixes(inputs: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Map each distinct input to the longest input that starts with it (its own row otherwise).

    In lexicographic order a sequence's extensions come right after it, so one backward pass over the
    sorted inputs finds, for each, the row it can be read from.
    """
    ordered = sorted(set(inputs))
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in range(len(ordered) - 1, -1, -1):
        seq = ordered[i]
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        host[seq] = host[nxt] if nxt is not None and nxt[: len(seq)] == seq else seq
    return host


@torch.inference_mode()
def score_continuations(
    model: StackedMixinForCausalLM,
    pairs: Sequence[TokenPair],
    max_length: int,
    batch_size: int,
    pad_id: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    stats: ScoreStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, continuation is the greedy choice) for each (context, continuation).

    `context` must be non-empty (the adapter supplies EOS for an empty one); an empty continuation scores
    (0.0, True). A continuation longer than `max_length` cannot be scored and is refused.
    """
    stats = stats if stats is not None else ScoreStats()
    device = model.head_weight.device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    jobs: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []  # (request index, input, continuation)
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            continue
        if not context:
            raise ValueError("score_continuations needs a non-empty context (prefix an EOS token)")
        if len(continuation) > max_length:
            raise ArchiFactoryError(
                f"a continuation of {len(continuation)} tokens is longer than the model's max_seq_len "
                f"({max_length}); it cannot be scored"
            )
        whole = [*context, *continuation]
        if len(whole) > max_length + 1:
            stats.truncated += 1
        jobs.append((index, tuple(whole[-(max_length + 1) : -1]), tuple(continuation)))
    stats.requests += len(pairs)

    host = _merge_prefixes([inp for _, inp, _ in jobs])
    rows = sorted(set(host.values()), key=lambda r: (-len(r), r))
    stats.rows += len(rows)
    row_of = {row: i for i, row in enumerate(rows)}
    jobs_by_row: list[list[tuple[int, int, tuple[int, ...]]]] = [[] for _ in rows]
    for index, inp, continuation in jobs:
        jobs_by_row[row_of[host[inp]]].append((index, len(inp), continuation))

    weight = model.head_weight.detach().float()
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for b, row in enumerate(batch):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        with autocast():
            hidden = model.backbone(ids.to(device)).hidden  # [B, T, D]
        # Flatten the scored positions of every request in the batch: (batch row, position, target, job).
        batch_idx, positions, targets, owner, owners = [], [], [], [], []
        for b in range(len(batch)):
            for index, length, continuation in jobs_by_row[first + b]:
                start = length - len(continuation)
                batch_idx.extend([b] * len(continuation))
                positions.extend(range(start, length))
                targets.extend(continuation)
                owner.extend([len(owners)] * len(continuation))
                owners.append(index)
        if not owners:
            continue
        tgt = torch.tensor(targets, device=device)
        scored = hidden[torch.tensor(batch_idx, device=device), torch.tensor(positions, device=device)]
        logprob, greedy = _score_tokens(scored.float(), weight, tgt)
        who = torch.tensor(owner, device=device)
        sums = torch.zeros(len(owners), device=device, dtype=torch.float64)
        sums.index_add_(0, who, logprob.double())
        misses = torch.zeros(len(owners), device=device, dtype=torch.long)
        misses.index_add_(0, who, (~greedy).long())
        for index, total, miss in zip(owners, sums.tolist(), misses.tolist()):  # one host sync per batch
            results[index] = (total, miss == 0)
        if progress is not None:
            progress(len(owners))
    return results


def _score_tokens(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Log-prob of each target and whether it is the argmax: hidden [N, D] fp32, weight [V, D], targets [N]."""
    logprobs, greedy = [], []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = hidden[start : start + HEAD_CHUNK] @ weight.t()  # [n, V] fp32
        tgt = targets[start : start + HEAD_CHUNK]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1))
        greedy.append(logits.argmax(dim=-1) == tgt)
    return torch.cat(logprobs), torch.cat(greedy)

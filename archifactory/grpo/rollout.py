"""Rollouts: sample completions with each architecture's exact decode state, recording the log-prob of
every sampled token as it is drawn (the "old" policy of the clipped ratio), and recompute log-probs of
those tokens with full forwards (the policy being updated, the reference).

Every prompt of a call is grouped with the prompts of its length and each group is prefilled and decoded
as one batch (a GRPO group is one prompt repeated G times, so it is always one batch). `sample` is the one
place that batches prompts: left-padded mixed-length batches (the padding contract, `pad_mask`) can
replace the grouping there without touching the rest.

Log-probs are of softmax(logits / temperature), the distribution that was sampled before top-p (TRL's
convention); a completion ends at a stop token, which is kept in the completion and its mask (the model
learns to stop), or at `max_completion_length`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from archifactory.generate.sampling import pick_tokens, process_logits
from archifactory.grpo.objective import token_logps
from archifactory.model.stack import StackedMixinForCausalLM


@dataclass
class Rollout:
    """N completions, right-padded to the longest (C tokens)."""

    prompts: list[list[int]]  # N prompts (a group's prompt repeated G times)
    tokens: Tensor  # [N, C] long: sampled tokens, padded with the pad id after the end
    mask: Tensor  # [N, C] bool: True on completion tokens (the stop token included)
    old_logp: Tensor  # [N, C] float32: log-prob of each token when it was sampled (0 on padding)

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(-1).tolist()

    def completion(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.mask[row].sum())].tolist()


def by_length(prompts: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """Prompt length -> the rows with that length, in order."""
    rows: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        rows.setdefault(len(prompt), []).append(index)
    return rows


@torch.no_grad()
def sample(
    model: StackedMixinForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_completion_length: int,
    temperature: float,
    top_p: float | None,
    stop_ids: Sequence[int],
    pad_id: int,
    seeds: Sequence[int],
) -> Rollout:
    """One completion per prompt (row i drawn with a generator seeded by `seeds[i]`)."""
    device = model.head_weight.device
    n = len(prompts)
    tokens = torch.full((n, max_completion_length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(n, max_completion_length, dtype=torch.bool, device=device)
    old_logp = torch.zeros(n, max_completion_length, device=device)
    was_training = model.training
    model.eval()
    try:
        for rows in by_length(prompts).values():
            ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)  # [B, P]
            generators = [torch.Generator().manual_seed(seeds[i]) for i in rows]
            t, m, lp = _sample_batch(
                model, ids, max_completion_length, temperature, top_p, stop_ids, generators
            )
            index = torch.tensor(rows, device=device)
            tokens[index, : t.shape[1]] = torch.where(m, t, pad_id)
            mask[index, : m.shape[1]] = m
            old_logp[index, : lp.shape[1]] = lp * m
    finally:
        model.train(was_training)
    longest = int(mask.sum(-1).max()) if n else 0
    return Rollout([list(p) for p in prompts], tokens[:, :longest], mask[:, :longest], old_logp[:, :longest])


def _sample_batch(
    model: StackedMixinForCausalLM,
    ids: Tensor,
    max_new: int,
    temperature: float,
    top_p: float | None,
    stop_ids: Sequence[int],
    generators: list[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-length prompts ids [B, P] -> (tokens, mask, log-probs), each [B, steps taken]."""
    batch = ids.shape[0]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    alive = torch.ones(batch, dtype=torch.bool, device=ids.device)
    tokens, masks, logps = [], [], []
    out = model(ids, state=model.init_state(batch, ids.device))
    for step in range(max_new):
        logits = out.logits[:, -1].float()  # [B, V]
        picked = pick_tokens(
            process_logits(logits, None, temperature, None, top_p, 1.0), temperature, generators
        )
        logp, _ = token_logps(logits[:, None], picked[:, None], temperature)
        tokens.append(picked)
        masks.append(alive.clone())
        logps.append(logp[:, 0])
        alive &= ~torch.isin(picked, stops)
        if not bool(alive.any()) or step == max_new - 1:
            break
        out = model(picked[:, None], state=out.state)  # finished rows keep stepping; their tokens are masked
    if not tokens:
        empty = ids.new_zeros(batch, 0)
        return empty, empty.bool(), empty.float()
    return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logps, 1)


def sequence_logps(
    model: StackedMixinForCausalLM, rollout: Rollout, temperature: float
) -> tuple[Tensor, Tensor]:
    """Full forwards over prompt + completion: (log-prob of each completion token, entropy at each
    position), both [N, C], with gradients when `model` requires them."""
    n, length = rollout.tokens.shape
    device = rollout.tokens.device
    logp = torch.zeros(n, length, device=device)
    entropy = torch.zeros(n, length, device=device)
    if length == 0:
        return logp, entropy
    parts = []
    for prompt_len, rows in by_length(rollout.prompts).items():
        index = torch.tensor(rows, device=device)
        prompt = torch.tensor([rollout.prompts[i] for i in rows], dtype=torch.long, device=device)
        ids = torch.cat([prompt, rollout.tokens[index]], dim=1)  # [B, P + C]
        logits = model(ids[:, :-1]).logits[:, prompt_len - 1 :]  # [B, C, V]: position t predicts token t+1
        parts.append((index, *token_logps(logits, rollout.tokens[index], temperature)))
    for index, part_logp, part_entropy in parts:
        logp = logp.index_put((index,), part_logp)
        entropy = entropy.index_put((index,), part_entropy)
    return logp, entropy

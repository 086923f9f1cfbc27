"""The GRPO objective on one rollout batch: group advantages, the clipped ratio, the k3 KL and the three
ways of averaging token losses. Plain functions of tensors, so tests hold them to hand computations.

Shapes: N = prompts x G completions, C = the longest completion of the batch (right-padded);
`mask` [N, C] is 1 on completion tokens (the end-of-turn token included: the model learns to stop).

Checked against TRL's `GRPOTrainer._compute_loss` and the papers:
- advantages (Shao et al. 2024): A_i = r_i - mean(r of its group), divided by the group's std (+1e-4)
  when `scale_rewards="group"` (the batch's std for "batch"); Dr. GRPO (Liu et al. 2025) does not divide:
  `scale_rewards="none"`.
- ratio rho = exp(logp - old_logp); token loss -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A),
  plus beta * KL with the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020), >= 0.
- `grpo`: each sequence's mean over its tokens, then the mean over sequences (DeepSeekMath);
  `dapo`: the sum over every token of the batch / the number of those tokens (DAPO, Yu et al. 2025);
  `dr_grpo`: the sum / (N x max_completion_length), a constant (Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """rewards [N] (groups of `num_generations` consecutive rows) -> advantages [N]."""
    grouped = rewards.view(-1, num_generations)  # [P, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return centred
    return centred / (std + STD_EPS)


def zero_spread_fraction(rewards: Tensor, num_generations: int) -> float:
    """The share of groups whose rewards are all equal (no learning signal: every advantage is 0)."""
    grouped = rewards.view(-1, num_generations)
    return float((grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean())


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(policy || reference) estimate, k3 = exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class LossParts:
    """The loss to minimise and the figures logged with it (detached)."""

    loss: Tensor
    clip_fraction: Tensor  # share of completion tokens whose ratio was clipped (low or high)
    kl: Tensor | None  # mean per-token KL, None when beta = 0


def reduce_tokens(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int) -> Tensor:
    """per-token values [N, C] -> one scalar, by `loss_type` (see the module docstring)."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None,
    loss_type: str,
    max_completion_length: int,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
) -> LossParts:
    """The clipped surrogate (+ beta KL) over completion tokens; logp/old_logp/ref_logp/mask [N, C],
    advantages [N]."""
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        per_token_kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    was_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return LossParts(
        reduce_tokens(per_token, mask, loss_type, max_completion_length),
        _masked_mean(was_clipped.float(), mask),
        kl,
    )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_logps(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """logits [N, C, V] predicting tokens [N, C] -> (log-prob of each token, entropy of each position),
    both [N, C], of the distribution softmax(logits / temperature) the tokens were sampled from."""
    logprobs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    picked = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return picked, entropy

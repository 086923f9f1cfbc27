"""Shared pieces of the routed FFNs (`moe`, `dora_moe`, `hyper_moe`): the top-k router with its balance
losses and aux-loss-free bias, the router metrics, and a plain SwiGLU of explicit width.

Not a registered component (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.ffn._moe_dispatch import DISPATCH_MODES, count_per_expert
from archifactory.model.ffn.base import FeedForward, FFNAux

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class Routing:
    """The router's decision for N tokens."""

    indices: Tensor  # [N, k] chosen experts, distinct per token
    weights: Tensor  # [N, k] combine weights (scores of the chosen experts, renormalised if asked)
    counts: Tensor  # [E] int64, routed (token, expert) assignments per expert, before any capacity drop
    aux_loss: Tensor  # scalar, Switch/GShard balance loss (unweighted)
    z_loss: Tensor  # scalar, router z-loss (unweighted)


class TopKRouter(nn.Module):
    """Linear router → softmax or sigmoid scores → top-k, with balance losses and a selection-only bias.

    - Selection uses `scores + expert_bias`; the combine weights use the scores alone (DeepSeek-V3's
      auxiliary-loss-free balancing, Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
      Mixture-of-Experts"). The bias is a persistent buffer (it is model state and resumes exactly); it
      stays zero unless `bias_update_rate > 0`.
    - `aux_loss` = E · Σ_e f_e · P_e (Switch Transformer, Fedus et al. 2021; GShard, Lepikhin et al. 2020),
      with f_e the fraction of the N·k routed assignments that went to expert e (no gradient) and P_e the
      mean router probability of e (the per-token normalised scores for sigmoid). It is 1 under perfectly
      uniform routing, for every k.
    - `z_loss` = mean_t logsumexp(logits_t)² (ST-MoE, Zoph et al. 2022) keeps the logits small.

    Router math runs in at least fp32 with autocast off: top-k decisions are sensitive to rounding.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        score_func: str,
        renormalize: bool,
        bias_update_rate: float,
    ) -> None:
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ArchiFactoryError(f"ffn.score_func={score_func!r}; choose one of {', '.join(SCORE_FUNCS)}")
        if not 1 <= top_k <= num_experts:
            raise ArchiFactoryError(f"ffn.top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.bias_update_rate = bias_update_rate
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # int64 so that `model.double()` / `.bfloat16()` leave the counts exact
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Routing:
        """x [N, D] -> Routing."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))  # [N, E]
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = torch.topk(
            scores.detach() + self.expert_bias.to(dtype), self.top_k, dim=-1
        ).indices  # [N, k]
        weights = scores.gather(1, indices)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        counts = count_per_expert(indices, self.num_experts)
        if self.training and self.bias_update_rate > 0:
            self.expert_counts += counts

        probs = scores if self.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        fraction = counts.to(dtype) / indices.numel()
        aux_loss = self.num_experts * (fraction * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return Routing(indices, weights.to(x.dtype), counts, aux_loss, z_loss)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's sign rule on the load accumulated since the last call: b_e += rate · sign(mean − n_e)
        (overloaded experts become less likely to be chosen, underloaded ones more), then reset the counts.
        Under data parallelism the counts are summed over ranks first, so every rank keeps the same bias."""
        if self.bias_update_rate <= 0:
            return
        counts = self.expert_counts.to(self.expert_bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        if counts.sum() > 0:  # sync; once per optimizer step
            self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.expert_counts.zero_()


def check_dispatch(dispatch: str, capacity_factor: float | None) -> None:
    """The dispatch options every routed FFN takes: a known mode and a positive (or null) capacity factor."""
    if dispatch not in DISPATCH_MODES:
        raise ArchiFactoryError(f"ffn.dispatch={dispatch!r}; choose one of {', '.join(DISPATCH_MODES)}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ArchiFactoryError(f"ffn.capacity_factor={capacity_factor} must be positive (or null: dropless)")


def router_aux(routing: Routing, aux_loss_weight: float, z_loss_weight: float, dropped: Tensor) -> FFNAux:
    """The aux dict every routed FFN returns: the weighted loss plus detached metrics."""
    load = routing.counts.float() / routing.indices.numel()  # [E], sums to 1
    return {
        "loss": aux_loss_weight * routing.aux_loss + z_loss_weight * routing.z_loss,
        "aux_loss": routing.aux_loss.detach(),
        "z_loss": routing.z_loss.detach(),
        "load": load,
        "imbalance": load.max() / load.mean(),
        "dropped": dropped.detach().float(),
    }


class RoutedFeedForward(FeedForward):
    """Base of the routed FFNs: owns `self.router` (None on dense layers) and the per-step bias update."""

    router: TopKRouter | None

    def after_optimizer_step(self) -> None:
        """Called by the training loop once per optimizer step: the aux-loss-free bias update."""
        if self.router is not None:
            self.router.update_bias()


class GatedMLP(nn.Module):
    """silu(x W_gate) ⊙ (x W_up) → W_out with an explicit intermediate width. Used for shared experts, the
    dense layers of an interleaved MoE, and the base of `dora_moe`. Its owner declares `out_proj` as a
    residual projection in its `init_roles`."""

    def __init__(self, hidden_size: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate
        self.gate_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate, bias=False)
        self.out_proj = nn.Linear(intermediate, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

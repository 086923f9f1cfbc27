"""Sparse mixture of SwiGLU experts with top-k routing, dropless grouped dispatch and balance controls."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_ffn
from archifactory.model.ffn._moe_core import (
    GatedMLP,
    RoutedFeedForward,
    Routing,
    TopKRouter,
    check_dispatch,
    router_aux,
)
from archifactory.model.ffn._moe_dispatch import combine, plan_dispatch
from archifactory.model.ffn.base import FFNAux, intermediate_size
from archifactory.model.roles import InitRoles


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on (raw parameters are not autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@register_ffn("moe")
class MoE(RoutedFeedForward):
    """Mixture of SwiGLU experts (Shazeer et al. 2017, "Outrageously Large Neural Networks"; top-k routing as
    in GShard 2020 / Mixtral 2024; fine-grained and shared experts as in DeepSeekMoE, Dai et al. 2024).

    y = Σ_{e ∈ topk(s(x) + b)} g_e(x) · SwiGLU_e(x) + Σ_shared SwiGLU_s(x), with s = softmax or sigmoid of the
    router logits, b the aux-loss-free selection bias and g the chosen scores (renormalised to sum to 1 when
    `renormalize`).

    Options:
        num_experts, top_k: routed experts and experts per token (8, 2).
        intermediate_multiplier, multiple_of: each expert's width = multiplier × hidden rounded up to a
            multiple of `multiple_of`. The defaults (4/3, 32) make two experts exactly as wide as the default
            `swiglu` (8/3, 64) at every hidden size: equal active FFN parameters, plus the router.
        granularity: fine-grained experts — each expert is split into `granularity` experts of 1/granularity
            the width (rounded up) and top_k is multiplied by it, so active and total parameters stay put.
        score_func: `softmax` or `sigmoid` (DeepSeek-V3); renormalize: make the top-k weights sum to 1.
        aux_loss_weight: weight of the Switch/GShard balance loss (0 turns it off).
        z_loss_weight: weight of the router z-loss (ST-MoE).
        bias_update_rate: > 0 turns on DeepSeek-V3's auxiliary-loss-free balancing (they use 0.001): a
            per-expert bias added to the scores for *selection only*. Training forwards count tokens per
            expert; the training loop calls `after_optimizer_step()` once per optimizer step, which moves the
            bias by ±rate toward uniform load (sign rule) and resets the counts.
        num_shared_experts: always-on experts of the same width, added unweighted (DeepSeekMoE).
        capacity_factor: None = dropless. Otherwise each expert takes at most
            ceil(factor · tokens · k / E) assignments (first choices before second choices, then token order);
            the rest are dropped (they add nothing) and counted in `dropped`. Capacity makes a token's output
            depend on the other tokens of the batch, in training and evaluation alike.
        dispatch: how assignments reach the experts (`_moe_dispatch.py`). `grouped`, `batched`, `loop`
            (the per-expert reference): sorted by expert, dropless unless `capacity_factor` is set; exact,
            but only `grouped` has static shapes, so the others break a compiled graph. `capacity`: a static
            [E, C] slot grid, C from `capacity_factor` (null: C = tokens, nothing drops, E/k times the
            expert work): compile-friendly in any dtype. `auto`: `capacity` when `capacity_factor` is set;
            otherwise `grouped` where `torch._grouped_mm` runs (under compile: bf16 only), else `batched`
            eager and `capacity` under compile.
        moe_every: interleave dense and MoE layers: layer i is MoE iff i % moe_every == moe_every - 1 (so
            with 2, layers 1, 3, 5, ... are MoE). Other layers are a dense SwiGLU as wide as the routed plus
            shared experts a token uses (same active FFN parameters, no router, empty aux).

    aux: "loss" (weighted sum to add), "aux_loss", "z_loss" (unweighted), "load" ([E] fraction of routed
    assignments per expert), "imbalance" (max/mean load), "dropped" (assignments over capacity).

    Init (declared through `init_roles`): the stacked expert input weights `w_in` are drawn like Linear
    weights, N(0, initializer_range²); the expert output weights `w_out` write into the residual stream
    and get the depth-scaled std, as do the shared experts' and dense layers' `out_proj`; the router
    follows the scheme.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_experts: int = 8,
        top_k: int = 2,
        intermediate_multiplier: float = 4 / 3,
        multiple_of: int = 32,
        granularity: int = 1,
        score_func: str = "softmax",
        renormalize: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias_update_rate: float = 0.0,
        num_shared_experts: int = 0,
        capacity_factor: float | None = None,
        dispatch: str = "auto",
        moe_every: int = 1,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        check_dispatch(dispatch, capacity_factor)
        if granularity < 1 or moe_every < 1 or num_shared_experts < 0:
            raise ArchiFactoryError(
                "ffn.granularity and ffn.moe_every must be >= 1, ffn.num_shared_experts >= 0"
            )
        self.num_experts, self.top_k = num_experts * granularity, top_k * granularity
        self.intermediate_size = math.ceil(
            intermediate_size(hidden_size, intermediate_multiplier, multiple_of) / granularity
        )
        self.num_shared_experts = num_shared_experts
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.capacity_factor, self.dispatch = capacity_factor, dispatch
        self.is_moe = layer_idx % moe_every == moe_every - 1
        width = self.intermediate_size
        self.router = None
        self.dense = self.shared = None
        if not self.is_moe:
            self.dense = GatedMLP(hidden_size, (self.top_k + num_shared_experts) * width)
            return
        self.router = TopKRouter(
            hidden_size, self.num_experts, self.top_k, score_func, renormalize, bias_update_rate
        )
        # [E, D, 2F]: gate and up fused, so a token's input half is one grouped matmul; [E, F, D] back.
        # N(0, 0.02²) here; the model's init scheme re-draws both (w_in as `matrices`, w_out as `residual`)
        # (scaled in place: randn * 0.02's values, with no second tensor when the matcher counts on meta)
        self.w_in = nn.Parameter(torch.randn(self.num_experts, hidden_size, 2 * width).mul_(0.02))
        self.w_out = nn.Parameter(torch.randn(self.num_experts, width, hidden_size).mul_(0.02))
        if num_shared_experts:
            self.shared = GatedMLP(hidden_size, num_shared_experts * width)

    def init_roles(self) -> InitRoles:
        if self.dense is not None:
            return InitRoles(residual=(self.dense.out_proj,))
        shared = () if self.shared is None else (self.shared.out_proj,)
        return InitRoles(residual=(self.w_out, *shared), matrices=(self.w_in,))

    def extra_repr(self) -> str:
        kind = f"moe experts={self.num_experts} top_k={self.top_k}" if self.is_moe else "dense"
        return (
            f"layer={self.layer_idx} {kind} width={self.intermediate_size} shared={self.num_shared_experts}"
        )

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        if self.dense is not None:
            return self.dense(x), {}
        flat = x.reshape(-1, self.hidden_size)  # [N, D]
        routing = self.router(flat)
        dtype = matmul_dtype(flat)
        widths = (self.hidden_size, 2 * self.intermediate_size, self.intermediate_size)
        dispatch = plan_dispatch(
            routing.indices,
            routing.weights,
            routing.counts,
            self.capacity_factor,
            self.dispatch,
            dtype,
            widths,
        )
        xs = flat[dispatch.token_idx].to(dtype)  # [M, D] grouped by expert, or [E, C, D] slots
        gate, up = dispatch.matmul(xs, self.w_in.to(dtype), self.dispatch).chunk(2, dim=-1)
        out = dispatch.matmul(F.silu(gate) * up, self.w_out.to(dtype), self.dispatch)  # [M, D] / [E, C, D]
        y = combine(out, dispatch, flat.shape[0]) + self.extra(flat, routing)
        aux = router_aux(routing, self.aux_loss_weight, self.z_loss_weight, dispatch.dropped)
        return y.view(x.shape), aux

    def extra(self, flat: Tensor, routing: Routing) -> Tensor | float:
        """What is added to the routed mixture: the shared experts (subclasses add more)."""
        return 0.0 if self.shared is None else self.shared(flat)

    def expert_parameters(self) -> int:
        """Parameters of one routed expert."""
        return 3 * self.hidden_size * self.intermediate_size

    def active_parameters(self) -> int:
        if not self.is_moe:
            return super().active_parameters()
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        return self.router.gate.weight.numel() + self.top_k * self.expert_parameters() + shared

    def flops_per_token(self) -> float:
        if not self.is_moe:
            return 2 * 3 * self.hidden_size * self.dense.intermediate_size
        used = self.top_k + self.num_shared_experts
        return 2 * self.hidden_size * self.num_experts + used * 2 * self.expert_parameters()

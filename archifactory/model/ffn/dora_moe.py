"""A parameter-cheap MoE: one shared SwiGLU whose input projections each expert re-weights with DoRA."""

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
    TopKRouter,
    check_dispatch,
    router_aux,
)
from archifactory.model.ffn._moe_dispatch import combine, plan_dispatch
from archifactory.model.ffn.base import FFNAux, intermediate_size
from archifactory.model.ffn.moe import matmul_dtype
from archifactory.model.roles import InitRoles


@register_ffn("dora_moe")
class DoRAMoE(RoutedFeedForward):
    """Mixture of DoRA experts over a shared SwiGLU (DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
    Adaptation"; mixtures of low-rank experts in the spirit of MixLoRA / MoLA, 2024).

    Design. The base is a SwiGLU with W_gate, W_up [F, D] and W_out [D, F], shared by every token. Expert e
    re-weights the two *input* projections with DoRA: for P ∈ {gate, up},

        W_P,e = m_P,e ⊙ (W_P + B_P,e A_P,e) / ‖W_P + B_P,e A_P,e‖_row,   A [r, D], B [F, r], m [F]

    (the norm is taken per output feature — DoRA's "column norm" in its [in, out] notation — and is not
    detached, so gradients are exact). A token with experts S and router weights g gets

        h_e = silu(W_gate,e x) ⊙ (W_up,e x),   y = W_out · Σ_{e∈S} g_e h_e.

    The output projection is shared and linear, so mixing the hidden states before it is exactly a mixture of
    k full SwiGLU experts; the cost is one dense SwiGLU plus k rank-r updates per projection. W_P x is
    computed once per token; the per-expert work is the low-rank product and a per-feature rescale
    (m / ‖·‖, with the norms of all E experts found from W A^T and A A^T, never materialising W + BA).

    Init: A ~ U(±1/√D) (LoRA), B = 0. DoRA initialises m = ‖W‖_row; here m is stored as an offset from the
    base's current row norms (`magnitude_delta`, zero-initialised), which keeps that init true after the
    model's init scheme re-draws W and ties the experts' magnitudes to the trained base. With zero B and
    zero offsets every expert *is* the base, so with `renormalize` (weights sum to 1) the layer equals its
    base SwiGLU exactly.

    Options: num_experts, top_k, rank; intermediate_multiplier, multiple_of (the base SwiGLU's width, as in
    `swiglu`); score_func, renormalize, aux_loss_weight, z_loss_weight, bias_update_rate (router and
    balancing, as in `moe`); capacity_factor and dispatch (as in `moe`: dropless by default; `capacity`
    runs the per-expert low-rank work on a static slot grid, compile-friendly). aux keys as in `moe`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_experts: int = 8,
        top_k: int = 2,
        rank: int = 8,
        intermediate_multiplier: float = 8 / 3,
        multiple_of: int = 64,
        score_func: str = "softmax",
        renormalize: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias_update_rate: float = 0.0,
        capacity_factor: float | None = None,
        dispatch: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        check_dispatch(dispatch, capacity_factor)
        if rank < 1:
            raise ArchiFactoryError(f"ffn.rank={rank} must be >= 1")
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.intermediate_size = width = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.capacity_factor, self.dispatch = capacity_factor, dispatch
        self.router = TopKRouter(hidden_size, num_experts, top_k, score_func, renormalize, bias_update_rate)
        self.base = GatedMLP(hidden_size, width)
        # index 0: gate projection, 1: up projection. Layouts are [in, out] for x @ A @ B.
        self.lora_a = nn.Parameter(torch.empty(2, num_experts, hidden_size, rank))
        self.lora_b = nn.Parameter(torch.zeros(2, num_experts, rank, width))
        self.magnitude_delta = nn.Parameter(torch.zeros(2, num_experts, width))
        with torch.no_grad():
            bound = 1 / math.sqrt(hidden_size)
            self.lora_a.uniform_(-bound, bound)

    def init_roles(self) -> InitRoles:
        # LoRA A ~ U(±1/√D), B = 0 and the magnitude offsets = 0 are drawn above
        return InitRoles(
            residual=(self.base.out_proj,), keep=(self.lora_a, self.lora_b, self.magnitude_delta)
        )

    def dora_scales(self, p: int) -> Tensor:
        """[E, F] per-expert, per-feature DoRA factor m / ‖W + BA‖ for projection p (0 gate, 1 up)."""
        weight = (self.base.gate_proj, self.base.up_proj)[p].weight  # [F, D]
        a, b = self.lora_a[p], self.lora_b[p]  # [E, D, r], [E, r, F]
        base_sq = weight.pow(2).sum(-1)  # [F]
        cross = torch.einsum("fd,edr,erf->ef", weight, a, b)  # Σ_d W[f,d]·(AB)[d,f]
        gram = a.transpose(-1, -2) @ a  # [E, r, r]
        update_sq = ((gram @ b) * b).sum(-2)  # [E, F] = ‖(AB)[:, f]‖²
        adapted = (base_sq + 2 * cross + update_sq).clamp_min(1e-30).sqrt()
        return (base_sq.sqrt() + self.magnitude_delta[p]) / adapted

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        flat = x.reshape(-1, self.hidden_size)  # [N, D]
        routing = self.router(flat)
        dtype = matmul_dtype(flat)
        widths = (self.hidden_size, self.rank, self.intermediate_size)
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
        projected = []
        for p, proj in enumerate((self.base.gate_proj, self.base.up_proj)):
            low = dispatch.matmul(xs, self.lora_a[p].to(dtype), self.dispatch)  # [M, r]
            low = dispatch.matmul(low, self.lora_b[p].to(dtype), self.dispatch)  # [M, F]
            pre = proj(flat)[dispatch.token_idx] + low
            projected.append(pre * self.dora_scales(p)[dispatch.expert_idx].to(pre.dtype))
        hidden = F.silu(projected[0]) * projected[1]  # [M, F] / [E, C, F]
        y = self.base.out_proj(combine(hidden, dispatch, flat.shape[0]))
        aux = router_aux(routing, self.aux_loss_weight, self.z_loss_weight, dispatch.dropped)
        return y.view(x.shape), aux

    def adapter_parameters(self) -> int:
        """Parameters of one DoRA expert (A, B and magnitude for both adapted projections)."""
        return 2 * (
            self.hidden_size * self.rank + self.rank * self.intermediate_size + self.intermediate_size
        )

    def active_parameters(self) -> int:
        base = sum(p.numel() for p in self.base.parameters())
        return base + self.router.gate.weight.numel() + self.top_k * self.adapter_parameters()

    def flops_per_token(self) -> float:
        """Base SwiGLU + router + the k experts' low-rank products. The per-batch cost of the E experts'
        norms (≈ 4·E·F·D·r FLOPs per forward, shared by all tokens) is not included."""
        low_rank = 2 * 2 * (self.hidden_size * self.rank + self.rank * self.intermediate_size)
        return (
            2 * 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size * self.num_experts
            + (self.top_k * low_rank)
        )

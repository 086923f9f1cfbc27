"""HyperMoE: a top-k MoE plus a per-token adapter generated from the experts that were *not* selected."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_ffn
from archifactory.model.ffn._moe_core import Routing
from archifactory.model.ffn.moe import MoE
from archifactory.model.roles import InitRoles


@register_ffn("hyper_moe")
class HyperMoE(MoE):
    """HyperMoE (Zhao, Qiu, Wu, Wang, He, Fu 2024, "HyperMoE: Towards Better Mixture of Experts via
    Transferring Among Experts", ACL 2024).

    Sparse routing leaves the knowledge of the unselected experts unused for a token. HyperMoE keeps the
    computation sparse but transfers that knowledge through a hypernetwork:

        c_t  = mean_{e ∉ S_t} emb_e                                  [d_e], unselected experts only
        h_t  = relu(W_c c_t + b_c)                                   [H], hypernetwork hidden state
        D_t  = reshape(G_down h_t + g_down, [D, b]),  U_t = reshape(G_up h_t + g_up, [b, D])
        y_t  = Σ_{e∈S_t} g_e SwiGLU_e(x_t) + (shared experts) + U_tᵀ relu(D_tᵀ x_t)

    i.e. the routed MoE of `moe` plus a "HyperExpert": a bottleneck adapter (width b) whose weights are
    generated per token from the embeddings of the experts it was *not* routed to. A token routed to all
    experts gets c = 0.

    Differences from the paper, on purpose: the paper shares one hypernetwork across layers and conditions it
    on a layer embedding; here each layer owns its hypernetwork (components are built per layer), so no layer
    embedding is needed. The adapter's own biases are omitted (the generators' biases g_down, g_up already
    give D_t and U_t a token-independent part). The per-token matrices are never materialised:
    D_tᵀ x = Σ_j h_j (G_down,j)ᵀ x is computed as (x · G_down) contracted with h, and likewise for U_t, so
    memory is O(tokens · b · H) rather than O(tokens · D · b).

    Init: expert embeddings ~ N(0, 1); `gen_up` is zero (declared `keep` in `init_roles`), so the
    HyperExpert starts at 0 and the layer starts equal to its base MoE (like LoRA's zero B).

    Options: every `moe` option except granularity / moe_every (see `moe`), plus `adapter_dim` (b),
    `embedding_dim` (d_e), `hypernet_dim` (H). aux keys as in `moe`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_experts: int = 8,
        top_k: int = 2,
        intermediate_multiplier: float = 4 / 3,
        multiple_of: int = 32,
        score_func: str = "softmax",
        renormalize: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        bias_update_rate: float = 0.0,
        num_shared_experts: int = 0,
        capacity_factor: float | None = None,
        dispatch: str = "auto",
        adapter_dim: int = 16,
        embedding_dim: int = 32,
        hypernet_dim: int = 16,
    ) -> None:
        super().__init__(
            hidden_size, layer_idx, num_experts=num_experts, top_k=top_k,
            intermediate_multiplier=intermediate_multiplier, multiple_of=multiple_of, granularity=1,
            score_func=score_func, renormalize=renormalize, aux_loss_weight=aux_loss_weight,
            z_loss_weight=z_loss_weight, bias_update_rate=bias_update_rate,
            num_shared_experts=num_shared_experts, capacity_factor=capacity_factor, dispatch=dispatch,
            moe_every=1,
        )  # fmt: skip
        if min(adapter_dim, embedding_dim, hypernet_dim) < 1:
            raise ArchiFactoryError("ffn.adapter_dim, ffn.embedding_dim and ffn.hypernet_dim must be >= 1")
        self.adapter_dim, self.embedding_dim, self.hypernet_dim = adapter_dim, embedding_dim, hypernet_dim
        self.expert_embedding = nn.Parameter(torch.randn(num_experts, embedding_dim))
        self.hyper_in = nn.Linear(embedding_dim, hypernet_dim)
        self.gen_down = nn.Linear(hypernet_dim, hidden_size * adapter_dim)  # rows ordered [D, b]
        self.gen_up = nn.Linear(hypernet_dim, adapter_dim * hidden_size)  # rows ordered [b, D]
        nn.init.zeros_(self.gen_up.weight)
        nn.init.zeros_(self.gen_up.bias)

    def init_roles(self) -> InitRoles:
        # gen_up writes the adapter output into the residual stream, but starts at zero (kept)
        base = super().init_roles()
        keep = (self.gen_up, self.expert_embedding)
        return InitRoles(residual=(*base.residual, self.gen_up), matrices=base.matrices, keep=keep)

    def extra(self, flat: Tensor, routing: Routing) -> Tensor | float:
        return super().extra(flat, routing) + self.hyper_expert(flat, routing.indices)

    def condition(self, indices: Tensor, dtype: torch.dtype) -> Tensor:
        """[N, k] selected experts -> [N, d_e], the mean embedding of the unselected experts."""
        unselected = torch.ones(indices.shape[0], self.num_experts, dtype=dtype, device=indices.device)
        unselected = unselected.scatter(1, indices, 0.0)  # [N, E]
        count = self.num_experts - self.top_k
        return (unselected @ self.expert_embedding.to(dtype)) / max(count, 1)

    def hyper_expert(self, flat: Tensor, indices: Tensor) -> Tensor:
        d, b, hdim = self.hidden_size, self.adapter_dim, self.hypernet_dim
        h = F.relu(self.hyper_in(self.condition(indices, flat.dtype)))  # [N, H]
        g_down = self.gen_down.weight.view(d, b * hdim)  # [D, b·H]
        down = (flat @ g_down.to(flat.dtype)).view(-1, b, hdim)  # [N, b, H] = per-j (G_down,j)ᵀ x
        bias_down = self.gen_down.bias.view(d, b).to(flat.dtype)
        act = F.relu((down * h.unsqueeze(1)).sum(-1) + flat @ bias_down)  # [N, b]
        g_up = self.gen_up.weight.view(b, d, hdim).transpose(1, 2).reshape(b * hdim, d)  # [b·H, D]
        outer = (act.unsqueeze(-1) * h.unsqueeze(1)).reshape(-1, b * hdim)  # [N, b·H]
        return outer @ g_up.to(flat.dtype) + act @ self.gen_up.bias.view(b, d).to(flat.dtype)

    def hyper_parameters(self) -> int:
        return sum(p.numel() for m in (self.hyper_in, self.gen_down, self.gen_up) for p in m.parameters())

    def active_parameters(self) -> int:
        unselected = (self.num_experts - self.top_k) * self.embedding_dim
        return super().active_parameters() + unselected + self.hyper_parameters()

    def flops_per_token(self) -> float:
        d, b, hdim = self.hidden_size, self.adapter_dim, self.hypernet_dim
        hyper = 2 * self.embedding_dim * hdim + 2 * 2 * d * b * hdim + 2 * 2 * d * b
        return super().flops_per_token() + hyper

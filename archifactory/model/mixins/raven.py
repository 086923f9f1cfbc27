"""Raven: gated slot attention whose slots are written by a top-k router (routed memory).

Pads of a padded batch (`ctx.pad_mask`) are identity steps: log gate 0 on every slot (α = 1) and write
s = 0, so neither slot bank moves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import fla_backend, grouped_heads, head_rms_norm, scaled_width, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.gsa import FUSED_KERNEL, gsa_forward
from archifactory.model.mixins.reference.simple_gla import expand_heads
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FEATURE_MAPS = {"swish": F.silu, "relu": F.relu}
DECAYS = ("Mamba2", "GLA")
ROUTER_SCORES = ("sigmoid", "softmax")


@register_mixin("raven")
class Raven(Mixin):
    """Raven (fla's `Raven` layer: gated slot attention with routed memory writes).

    GSA's two slot passes (`reference/gsa.py`) with a sparse write: per key/value head a router scores
    the M slots (sigmoid or softmax of r_proj x, optionally + a learnable selection bias), the top-k are
    chosen and weighted w (sigmoid scores renormalised over the chosen k), and only they decay and write:
        log α_t = w_t ⊙ f_t (0 off the chosen slots),   s_t = 1 − α_t,
        H^k_t = H^k_{t−1} diag(α_t) + k_t s_tᵀ,   p_t = softmax(q_tᵀ H^k_t),
        H^v_t = diag(α_t) H^v_{t−1} + s_t v_tᵀ,   o_t = H^v_tᵀ p_t
    with the decay f either Mamba2's per head, −exp(A_log)·softplus(a_proj x + dt_bias), or GLA's per slot,
    logsigmoid(f_proj x)/τ. q, k through the feature map (swish) and a per-head RMSNorm, v through the
    gate activation (SiLU); scale 1. Output: SiLU, then an RMSNorm over the width and out_proj, or with
    `use_output_gate` a per-head RMSNorm gated by SiLU(o_gate_proj x). fla adds Gumbel noise to the router
    logits in training; here that is `add_gumbel_noise` (off by default: with it a training forward depends
    on the RNG, so it is not a function of its input). Positional schemes are ignored (fla's optional
    rope is not an option). Decode state: H^k [B, H, d_k, M] and H^v [B, H, M, d_v].

    Options:
        num_heads; num_kv_heads (null = num_heads); expand_k / expand_v (1); num_slots: M (null = the key
        head size); topk (32, at most M); decay_type: `Mamba2` or `GLA`; gate_logit_normalizer: τ of the
        GLA decay (8); router_score: `sigmoid` or `softmax`; bias_rmm: the selection bias; add_gumbel_noise;
        feature_map: `swish` or `relu`; use_output_gate; norm_eps; chunk_size (16); backend: `auto`
        (fla's `chunk_gsa` for training calls on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        num_slots: int | None = None,
        topk: int = 32,
        decay_type: str = "Mamba2",
        gate_logit_normalizer: float = 8.0,
        router_score: str = "sigmoid",
        bias_rmm: bool = False,
        add_gumbel_noise: bool = False,
        feature_map: str = "swish",
        use_output_gate: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=raven"
        for option, value, choices in (
            ("feature_map", feature_map, tuple(FEATURE_MAPS)),
            ("decay_type", decay_type, DECAYS),
            ("router_score", router_score, ROUTER_SCORES),
        ):
            if value not in choices:
                raise ArchiFactoryError(f"{name}: {option}={value!r} is not one of {', '.join(choices)}")
        if chunk_size < 1 or gate_logit_normalizer <= 0 or (num_slots is not None and num_slots < 1):
            raise ArchiFactoryError(
                f"{name}: chunk_size and num_slots must be >= 1 and gate_logit_normalizer > 0"
            )
        self.backend = check_backend(backend, name)
        _, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.feature_map, self.normalizer = num_heads, feature_map, gate_logit_normalizer
        self.chunk_size, self.norm_eps, self.decay_type = chunk_size, norm_eps, decay_type
        self.router_score, self.add_gumbel_noise = router_score, add_gumbel_noise
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.num_slots = num_slots or self.head_k_dim
        self.topk = min(topk, self.num_slots) if num_slots is None else topk  # fla caps it for the default M
        if not 1 <= self.topk <= self.num_slots:
            raise ArchiFactoryError(f"{name}: topk={topk} must be in [1, num_slots={self.num_slots}]")
        kv, slots = self.num_kv_heads, self.num_slots
        decay_width = kv if decay_type == "Mamba2" else kv * slots  # fla's a_proj or f_proj
        self.widths = [self.key_dim, kv * self.head_k_dim, kv * self.head_v_dim, kv * slots, decay_width]
        self.proj = nn.Linear(hidden_size, sum(self.widths), bias=False)  # q, k, v, router, decay
        if decay_type == "Mamba2":  # fla: A ~ U[1e-4, 16], dt ~ log-U[1e-3, 0.1] (bias = inverse softplus)
            self.A_log = nn.Parameter(torch.empty(kv).uniform_(1e-4, 16).log())
            dt = torch.exp(torch.rand(kv) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(
                min=1e-4
            )
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.r_bias = nn.Parameter(torch.zeros(kv, slots)) if bias_rmm else None
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_k_dim))
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_k_dim))
        self.o_gate_proj = nn.Linear(hidden_size, self.value_dim, bias=False) if use_output_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim if use_output_gate else self.value_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # drawn above

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, slots, dtype = self.num_heads, self.num_slots, compute_dtype(dtype)
        return {
            "keys": torch.zeros(batch_size, heads, self.head_k_dim, slots, device=device, dtype=dtype),
            "values": torch.zeros(batch_size, heads, slots, self.head_v_dim, device=device, dtype=dtype),
        }

    def routed_decay(self, router: Tensor, decay: Tensor) -> Tensor:
        """The log slot gates [B, T, H_kv, M]: the decay (per head [.., 1] or per slot) times the top-k
        routing weights, 0 off the chosen slots. Router logits [B, T, H_kv, M] in the compute dtype."""
        if self.add_gumbel_noise and self.training:  # Gumbel(0, 1) = −log(Exp(1))
            router = router - torch.empty_like(router).exponential_().log()
        scores = router.sigmoid() if self.router_score == "sigmoid" else router.softmax(-1)
        chosen = (scores if self.r_bias is None else scores + self.r_bias.to(scores.dtype)).topk(
            self.topk, -1
        )
        weights = scores.gather(-1, chosen.indices)
        if self.router_score == "sigmoid":
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-9)
        routed = torch.zeros_like(scores).scatter(-1, chosen.indices, weights)
        return decay * routed

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        q, k, v, router, decay = self.proj(x).split(self.widths, dim=-1)
        kv_heads = (batch, seq_len, self.num_kv_heads, -1)
        phi = FEATURE_MAPS[self.feature_map]
        q = head_rms_norm(phi(q).view(batch, seq_len, self.num_heads, -1), self.q_norm_weight, self.norm_eps)
        k = head_rms_norm(phi(k).view(kv_heads), self.k_norm_weight, self.norm_eps)
        q, k = q.view(batch, seq_len, self.num_heads, -1), k.view(kv_heads)
        v = F.silu(v).view(kv_heads)
        decay = decay.to(dtype).view(kv_heads)
        if self.decay_type == "Mamba2":
            decay = -self.A_log.to(dtype).exp()[:, None] * F.softplus(decay + self.dt_bias.to(dtype)[:, None])
        else:
            decay = F.logsigmoid(decay) / self.normalizer
        g = zero_pads(self.routed_decay(router.to(dtype).view(kv_heads), decay), ctx)  # pads: α = 1, s = 0
        k, v, g = (expand_heads(t, self.num_heads, 2) for t in (k, v, g))
        past = None if state is None else (state["keys"], state["values"])
        out, new = gsa_forward(q, k, v, -torch.expm1(g), g, 1.0, past, self.backend_name(), self.chunk_size)
        out = F.silu(out.to(dtype))  # [B, T, H, V]
        if self.o_gate_proj is None:
            y = head_rms_norm(out.reshape(batch, seq_len, 1, -1), self.norm_weight, self.norm_eps)
        else:
            y = head_rms_norm(out, self.norm_weight, self.norm_eps, self.o_gate_proj(x))
        y = self.out_proj(y.to(x.dtype))
        return y, None if new is None else {"keys": new[0], "values": new[1]}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.proj.weight, FUSED_KERNEL, "mixin=raven")

    def flops_per_token(self, seq_len: int) -> float:
        chunk, slots = min(self.chunk_size, max(seq_len, 1)), self.num_slots
        dk, dv = self.head_k_dim, self.head_v_dim
        # per head and token as `gsa` (two slot passes and the softmax over the slots), plus the router's
        # scores and top-k and the q/k norms
        first = 2 * chunk * dk + 4 * chunk * slots + 4 * dk * slots
        second = 2 * chunk * slots + 4 * chunk * (slots + dv) + 4 * slots * dv
        return projection_flops(self) + self.num_heads * (first + second + 10 * slots + 8 * dk)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.num_slots * (self.head_k_dim + self.head_v_dim)

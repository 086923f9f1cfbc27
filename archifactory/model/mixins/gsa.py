"""Gated slot attention: a bounded bank of memory slots, written and read by two gated linear passes."""

from __future__ import annotations

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


@register_mixin("gsa")
class GatedSlotAttention(Mixin):
    """Gated Slot Attention (Zhang et al., "Gated Slot Attention for Efficient Linear-Time Sequence
    Modeling", 2024; fla's `GatedSlotAttention`).

    Each head keeps M memory slots. A per-slot forget gate α = exp(logsigmoid(f_proj x)/τ) decays them
    and the complementary write s = 1 − α stores the token (ABC's bounded memory with GLA-style gates):
        H^k_t = H^k_{t−1} diag(α_t) + k_t s_tᵀ,   p_t = softmax(q_tᵀ H^k_t)   (which slots to read)
        H^v_t = diag(α_t) H^v_{t−1} + s_t v_tᵀ,   o_t = H^v_tᵀ p_t
    with q, k through a feature map (swish) and v through SiLU, scale 1 (as fla's layer); chunked in
    `reference/gsa.py`, on CUDA fla's `chunk_gsa` for training. Then SiLU, an RMSNorm over all heads
    and out_proj. Key/value heads and gates may be grouped (num_kv_heads). Positional schemes are ignored.
    Decode state: H^k [B, H, d_k, M] and H^v [B, H, M, d_v] (fp32). No short convolution (fla's default).

    Options:
        num_heads; num_kv_heads (null = num_heads); expand_k / expand_v: key and value widths as multiples
        of hidden (1); num_slots: M (null = the key head size); gate_logit_normalizer: τ (8);
        feature_map: `swish` or `relu`; norm_eps; chunk_size: reference chunk length (16: its in-chunk
        decays are [C, C, M] per head); backend: `auto`, `reference` or `fused`.
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
        gate_logit_normalizer: float = 8.0,
        feature_map: str = "swish",
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=gsa"
        if feature_map not in FEATURE_MAPS:
            raise ArchiFactoryError(
                f"{name}: feature_map={feature_map!r} is not one of {', '.join(FEATURE_MAPS)}"
            )
        if chunk_size < 1 or gate_logit_normalizer <= 0 or (num_slots is not None and num_slots < 1):
            raise ArchiFactoryError(
                f"{name}: chunk_size and num_slots must be >= 1 and gate_logit_normalizer > 0"
            )
        self.backend = check_backend(backend, name)
        _, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.feature_map, self.normalizer = num_heads, feature_map, gate_logit_normalizer
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.num_slots = num_slots or self.head_k_dim
        kv = self.num_kv_heads
        self.widths = [self.key_dim, kv * self.head_k_dim, kv * self.head_v_dim, kv * self.num_slots]
        self.proj = nn.Linear(hidden_size, sum(self.widths), bias=False)  # q, k, v and the slot gates
        self.norm_weight = nn.Parameter(torch.ones(self.value_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gain, drawn above

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, slots, dtype = self.num_heads, self.num_slots, compute_dtype(dtype)
        return {
            "keys": torch.zeros(batch_size, heads, self.head_k_dim, slots, device=device, dtype=dtype),
            "values": torch.zeros(batch_size, heads, slots, self.head_v_dim, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v, f = self.proj(x).split(self.widths, dim=-1)
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(q).view(batch, seq_len, self.num_heads, self.head_k_dim)

        def per_head(t: Tensor, width: int) -> Tensor:  # [B, T, H_kv·w] -> [B, T, H, w]
            return expand_heads(t.view(batch, seq_len, self.num_kv_heads, width), self.num_heads, 2)

        k, v = per_head(phi(k), self.head_k_dim), per_head(F.silu(v), self.head_v_dim)
        # a pad step: log gate 0 (α = 1) and write s = 0, so neither slot bank moves
        g = zero_pads(
            per_head(F.logsigmoid(f.to(compute_dtype(x.dtype))) / self.normalizer, self.num_slots), ctx
        )
        s = -torch.expm1(g)  # 1 − α
        past = None if state is None else (state["keys"], state["values"])
        out, new = gsa_forward(q, k, v, s, g, 1.0, past, self.backend_name(), self.chunk_size)
        y = head_rms_norm(
            F.silu(out.to(compute_dtype(x.dtype))).reshape(batch, seq_len, 1, -1),
            self.norm_weight,
            self.norm_eps,
        )
        y = self.out_proj(y.to(x.dtype))
        return y, None if new is None else {"keys": new[0], "values": new[1]}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.proj.weight, FUSED_KERNEL, "mixin=gsa")

    def flops_per_token(self, seq_len: int) -> float:
        chunk, slots = min(self.chunk_size, max(seq_len, 1)), self.num_slots
        dk, dv = self.head_k_dim, self.head_v_dim
        # per head and token, each pass: in-chunk scores and the slot-wise decayed sum over a chunk, the
        # state read and the state update; plus the softmax over the slots
        first = 2 * chunk * dk + 4 * chunk * slots + 4 * dk * slots
        second = 2 * chunk * slots + 4 * chunk * (slots + dv) + 4 * slots * dv
        return projection_flops(self) + self.num_heads * (first + second + 5 * slots)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.num_slots * (self.head_k_dim + self.head_v_dim)

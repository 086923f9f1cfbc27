"""Multi-head latent attention (MLA) with decoupled RoPE, as in DeepSeek-V2."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS, causal_attention
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import append_cache, check_divisible
from archifactory.model.norms import RMSNorm
from archifactory.model.positional import PositionContext, RotaryPositional
from archifactory.model.roles import InitRoles


@register_mixin("mla")
class MultiHeadLatentAttention(Mixin):
    """Multi-head latent attention (DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient
    Mixture-of-Experts Language Model", 2024).

    Keys and values of all heads are up-projected from one small per-token latent, so decoding caches only
    that latent plus one rope key shared by every head, instead of full per-head K and V:

        c_kv = RMSNorm(x W_dkv)                     [B, T, r]        the cached KV latent
        k_r  = RoPE(x W_kr)                         [B, T, d_r]      the cached rope key, shared by heads
        k_h  = [c_kv W_uk_h ; k_r],  v_h = c_kv W_uv_h               per head: nope part + shared rope part
        q_h  = [q_nope_h ; RoPE(q_rope_h)],  q = x W_q or RMSNorm(x W_dq) W_uq (low-rank queries)
        y    = concat_h softmax(q_h k_h^T / sqrt(d_nope + d_r) + causal mask [+ alibi]) v_h  W_o

    RoPE touches only the decoupled rope parts: with positional=rope they are rotated by the model's scheme
    (its theta); with any other scheme MLA applies its own rotary with `rope_theta`, so MLA always has its
    decoupled RoPE (as in the paper), and additive schemes (learned/sinusoidal) or ALiBi's bias come on
    top. The nope parts never see a rotation, which is what lets W_uk be absorbed into the query.

    Training runs the expanded form (K/V up-projected from the latent, then ordinary attention). Decoding
    (any call with a state) runs the absorbed form: q_nope W_uk_h^T scores directly against the cached
    latent and the attention output is mapped through W_uv_h afterwards, so no full K/V is ever built from
    the cache; both forms compute the same function. Decode state: {"c_kv": [B, T, r], "k_rope": [B, T, d_r]}.

    Init: every weight is an nn.Linear (the model's N(0, 0.02) scheme; `out_proj` depth-scaled) and the two
    RMSNorm weights start at 1; there are no other parameters.

    Options (None = the paper's ratios to the head size d_h = hidden_size / num_heads):
        num_heads: query heads.
        kv_lora_rank: r, the KV latent width (None = 4 d_h, DeepSeek-V2's 512 for d_h = 128).
        q_lora_rank: width of the low-rank query latent; 0 = direct query projection (as DeepSeek-V2-Lite).
        qk_nope_head_dim: per-head query/key width without rotation (None = d_h).
        qk_rope_head_dim: d_r, per-head width of the decoupled rope part, even (None = d_h / 2).
        v_head_dim: per-head value width (None = d_h).
        rope_theta: frequency base of MLA's own rotary, used when positional is not rope.
        norm_eps: epsilon of the two latent RMSNorms (kv_norm, q_norm); 1e-5 by default, DeepSeek-V2/V3
            use 1e-6 (their `rms_norm_eps`).
        backend: `auto`/`sdpa`/`fused` (torch's scaled_dot_product_attention) or `reference` (explicit fp32
            softmax, the oracle).
    """

    match_option = "kv_lora_rank"  # the expansion parameter matching may re-solve

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        kv_lora_rank: int | None = None,
        q_lora_rank: int = 0,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        head_dim = check_divisible(hidden_size, num_heads, "mixin=mla")
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank or 4 * head_dim
        self.q_lora_rank = q_lora_rank
        self.nope_dim = qk_nope_head_dim or head_dim
        self.rope_dim = qk_rope_head_dim or max(2, head_dim // 4 * 2)
        self.v_dim = v_head_dim or head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        if self.rope_dim % 2:
            raise ArchiFactoryError(f"mixin=mla: qk_rope_head_dim={self.rope_dim} must be even for rotary")
        if min(self.kv_lora_rank, self.nope_dim, self.v_dim, self.rope_dim) <= 0 or q_lora_rank < 0:
            raise ArchiFactoryError(
                "mixin=mla: ranks and head dimensions must be positive (q_lora_rank >= 0)"
            )
        if norm_eps <= 0:
            raise ArchiFactoryError(
                f"mixin=mla: norm_eps={norm_eps}; use a positive epsilon (DeepSeek: 1e-6)"
            )
        check_backend(backend, "mixin=mla", ATTENTION_BACKENDS)
        self.backend = "sdpa" if backend in ("auto", "fused") else backend

        q_size = num_heads * self.qk_dim
        if q_lora_rank:
            self.q_down = nn.Linear(hidden_size, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.q_up = nn.Linear(q_lora_rank, q_size, bias=False)
        else:
            self.q_proj = nn.Linear(hidden_size, q_size, bias=False)
        # W_dkv and W_kr in one matmul: [latent r | rope key d_r]
        self.kv_down = nn.Linear(hidden_size, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, norm_eps)
        # W_uk and W_uv of every head in one matmul: per head [nope key | value]
        self.kv_up = nn.Linear(self.kv_lora_rank, num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.out_proj = nn.Linear(num_heads * self.v_dim, hidden_size, bias=False)
        self.own_rope = RotaryPositional(hidden_size, max_seq_len=0, theta=rope_theta)  # no parameters

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        return {
            "c_kv": torch.zeros(batch_size, 0, self.kv_lora_rank, device=device, dtype=dtype),
            "k_rope": torch.zeros(batch_size, 0, self.rope_dim, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(batch, seq_len, self.num_heads, self.qk_dim).split(
            [self.nope_dim, self.rope_dim], -1
        )
        q_rope = self._rotate(q_rope, ctx)  # [B, T, H, d_r]
        c_kv, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)  # [B, T, r]
        k_rope = self._rotate(k_rope[:, :, None, :], ctx)[:, :, 0]  # [B, T, d_r], one key for all heads

        cache, new_state = append_cache(state, 1, c_kv=c_kv, k_rope=k_rope)
        c_kv, k_rope = cache["c_kv"], cache["k_rope"]  # [B, Tk, r], [B, Tk, d_r]
        past = c_kv.shape[1] - seq_len
        bias = ctx.attention_bias(self.num_heads, past)  # [H, Tq, Tk] or None
        key_mask = ctx.key_mask(past)  # [B, Tk] in a padded batch, else None
        if state is None:
            y = self._expanded(q_nope, q_rope, c_kv, k_rope, past, bias, key_mask)
        else:
            y = self._absorbed(q_nope, q_rope, c_kv, k_rope, past, bias, key_mask)
        return self.out_proj(y.reshape(batch, seq_len, self.num_heads * self.v_dim)), new_state

    def _rotate(self, x: Tensor, ctx: PositionContext) -> Tensor:
        """Decoupled RoPE on x [B, T, H, d_r]: the model's rope when there is one, else MLA's own."""
        if isinstance(ctx.scheme, RotaryPositional):
            return ctx.rotate(x)
        return self.own_rope.rotate(x, ctx.positions)

    def _expanded(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        c_kv: Tensor,
        k_rope: Tensor,
        past: int,
        bias: Tensor | None,
        key_mask: Tensor | None,
    ) -> Tensor:
        """Training form: up-project K/V from the latent and attend. Returns [B, T, H, d_v]."""
        batch, total, _ = c_kv.shape
        kv = self.kv_up(c_kv).view(batch, total, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_shared = k_rope[:, :, None, :].expand(batch, total, self.num_heads, self.rope_dim)
        k = torch.cat([k_nope, k_shared], dim=-1)  # [B, Tk, H, d_nope + d_r]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, H, d_nope + d_r]
        y = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), past, bias, key_mask)
        return y.transpose(1, 2)

    def _absorbed(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        c_kv: Tensor,
        k_rope: Tensor,
        past: int,
        bias: Tensor | None,
        key_mask: Tensor | None,
    ) -> Tensor:
        """Decode form: fold W_uk into the query and W_uv after the attention, attending over the cached
        latent directly (q_nope·(W_uk c) = (q_nope W_uk)·c). Returns [B, T, H, d_v]."""
        batch, total, _ = c_kv.shape
        w_up = self.kv_up.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_up.split([self.nope_dim, self.v_dim], dim=1)  # [H, d_nope, r], [H, d_v, r]
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # [B, H, T, r + d_r]
        shape = (batch, self.num_heads, total)
        k = torch.cat([c_kv, k_rope], dim=-1)[:, None].expand(*shape, self.kv_lora_rank + self.rope_dim)
        v = c_kv[:, None].expand(*shape, self.kv_lora_rank)  # [B, H, Tk, r], shared by heads
        y_latent = self._attend(q, k, v, past, bias, key_mask)  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bthv", y_latent, w_uv)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, past: int, bias: Tensor | None, key_mask: Tensor | None
    ) -> Tensor:
        """Logits scaled by 1/sqrt(d_nope + d_r) whatever q's width (the absorbed form's q is wider);
        pad keys of a padded batch masked."""
        scale = 1.0 / math.sqrt(self.qk_dim)
        return causal_attention(q, k, v, past, bias, self.backend, scale=scale, key_mask=key_mask)

    def backend_name(self) -> str:
        return self.backend

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the training (expanded) form: every projection plus q·k and p·v over the
        causal prefix ((seq_len + 1) / 2 keys per query on average)."""
        d, h, r = self.hidden_size, self.num_heads, self.kv_lora_rank
        q_proj = 2 * self.q_lora_rank * (d + h * self.qk_dim) if self.q_lora_rank else 2 * d * h * self.qk_dim
        kv_proj = 2 * d * (r + self.rope_dim) + 2 * r * h * (self.nope_dim + self.v_dim)
        out_proj = 2 * h * self.v_dim * d
        attention = 2 * h * (self.qk_dim + self.v_dim) * (seq_len + 1) / 2
        return q_proj + kv_proj + out_proj + attention

    def state_size(self, seq_len: int) -> int:
        return (self.kv_lora_rank + self.rope_dim) * seq_len

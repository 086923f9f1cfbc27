"""Stick-breaking attention: each key takes a sigmoid share of what the nearer keys left of the stick."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import append_cache, fla_backend, fla_op, grouped_heads, head_rms_norm
from archifactory.model.mixins.reference.stickbreaking import FUSED_KERNEL, stickbreaking_attention
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

HALF = (torch.float16, torch.bfloat16)  # fla's kernel takes fp16/bf16 only


@register_mixin("stickbreaking_attn")
class StickBreakingAttention(Mixin):
    """Stick-breaking attention (Tan et al., "Scaling Stick-Breaking Attention: An Efficient Implementation
    and In-depth Study", 2024; fla's `StickBreakingAttention`).

    Softmax is replaced by a stick-breaking process over the keys, nearest first: with
    z_ij = q_i·k_j / sqrt(d),
        o_i = Σ_{j<i} σ(z_ij) Π_{j<l<i} (1 − σ(z_il)) v_j
    (j <= i and j < l <= i with `attend_current`), so recency is built in and the weights sum to at most 1
    (`reference/stickbreaking.py`). fla uses no positional embedding with it (`positional=none`); other
    schemes still apply (rope rotates q/k, alibi adds its bias to z). Grouped K/V heads, optional per-head
    RMSNorm on q and k. Decode state: the KV cache [B, H_kv, T, d] (each query recomputes its stick over
    the cache). In a padded batch the pad keys are masked: they take no share and leave the stick as it
    was. On CUDA fla's `parallel_stickbreaking_attn` runs fp16/bf16 training calls; calls with a state, a
    pad mask, alibi or fp32 inputs take the reference.

    Options:
        num_heads; num_kv_heads (null = num_heads); qkv_bias: biases on q/k/v; qk_norm: RMSNorm on q and
        k per head; attend_current: a query also attends its own key (false, fla's); norm_eps: the q/k
        norm's (1e-6); backend: `auto`, `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attend_current: bool = False,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=stickbreaking_attn"
        self.backend = check_backend(backend, name)
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.attend_current, self.norm_eps = num_heads, attend_current, norm_eps
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the q/k norm gains

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def _norm(self, x: Tensor, weight: Tensor | None) -> Tensor:
        """The optional per-head RMSNorm of x [B, T, H, D]."""
        if weight is None:
            return x
        return head_rms_norm(x, weight, self.norm_eps).view(x.shape).to(x.dtype)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        q = self._norm(q.view(batch, seq_len, self.num_heads, self.head_dim), self.q_norm_weight)
        k = self._norm(k.view(batch, seq_len, self.num_kv_heads, self.head_dim), self.k_norm_weight)
        q, k = ctx.rotate(q).transpose(1, 2), ctx.rotate(k).transpose(1, 2)  # [B, H, T, D]
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cache, new_state = append_cache(state, 2, k=k, v=v)
        k, v = cache["k"], cache["v"]  # [B, H_kv, Tk, D]
        past = k.shape[2] - seq_len
        alibi = ctx.attention_bias(self.num_heads, past)  # [H, Tq, Tk] or None
        key_mask = ctx.key_mask(past)  # [B, Tk] in a padded batch (fla's kernel has no mask)
        fused = self.backend_name() == "fused"  # resolved first: backend=fused refuses on CPU
        plain = (
            state is None and alibi is None and key_mask is None and q.dtype in HALF and k.dtype == q.dtype
        )
        if fused and plain:
            kernel = fla_op(*FUSED_KERNEL)
            y, _ = kernel(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attend_current=self.attend_current
            )  # [B, T, H, D]
            y = y.transpose(1, 2)
        else:
            y = stickbreaking_attention(q, k, v, past, self.attend_current, key_mask, alibi)
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y.to(x.dtype)), new_state

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=stickbreaking_attn")

    def flops_per_token(self, seq_len: int) -> float:
        # q·k and the weighted sum of v over the causal prefix (on average (seq_len + 1) / 2 keys), plus
        # per key and head the two log-sigmoids, the suffix sum and the exp of the stick
        keys = (seq_len + 1) / 2
        return projection_flops(self) + (2 * 2 * self.hidden_size + 8 * self.num_heads) * keys

    def state_size(self, seq_len: int) -> int:
        return 2 * self.kv_size * seq_len

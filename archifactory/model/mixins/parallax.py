"""Parallax: softmax attention with a learned first-order (local linear) correction from a second query."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import with_key_mask
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    append_cache,
    fla_backend,
    fla_op,
    grouped_heads,
    optional_head_norm,
)
from archifactory.model.mixins.reference.parallax import FUSED_KERNEL, parallax_attention
from archifactory.model.mixins.swa import causal_mask, mean_keys
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

HALF = (torch.float16, torch.bfloat16)  # fla's kernel takes fp16/bf16 only


@register_mixin("parallax")
class Parallax(Mixin):
    """Parallax (Zuo et al., "Parallax: Parameterized Local Linear Attention for Language Modeling", 2026;
    fla's `Parallax`).

    Softmax attention is a locally constant (Nadaraya–Watson) fit of the values around the query; local
    linear attention fits a locally linear one. Parallax learns the probe of that fit as a second query
    projection r and keeps the first-order correction: with p = softmax(q·k/√d) over the visible keys and
    s_j = r·k_j,
        o = E_p[v] (1 + E_p[s]) − E_p[s v] = E_p[v] − Cov_p(s, v)
    (`reference/parallax.py`). The model's positional scheme rotates q, r (at the query positions) and k
    (fla: rope on all three). Grouped K/V heads, optional per-head RMSNorm on q, r and k, an optional
    sliding window. Decode state: the KV cache [B, H_kv, T, d] (with a window, its last window − 1
    positions); r is query-side and never cached. In a padded batch the pad keys are masked (weight 0 in
    every term). On CUDA fla's `parallel_parallax` runs fp16/bf16 training calls; calls with a state, a pad
    mask, an additive positional bias or fp32 inputs take the reference.

    Options:
        num_heads; num_kv_heads (null = num_heads); qkv_bias: biases on q/r/k/v; qk_norm: RMSNorm on q, r
        and k per head; window_size: keys each query sees, itself included (null = full causal);
        norm_eps: the q/r/k norm's (1e-5); backend: `auto`, `reference` or `fused`.
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
        window_size: int | None = None,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=parallax"
        self.backend = check_backend(backend, name)
        if window_size is not None and window_size < 1:
            raise ArchiFactoryError(f"{name}: window_size={window_size} must be >= 1 or null (full causal)")
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.window_size, self.norm_eps = num_heads, window_size, norm_eps
        self.kv_size = self.num_kv_heads * self.head_dim
        self.widths = [hidden_size, hidden_size, self.kv_size, self.kv_size]  # q, r, k, v
        self.qrkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        norms = ("q_norm_weight", "r_norm_weight", "k_norm_weight")
        for norm in norms:
            setattr(self, norm, nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the q/r/k norm gains

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def _heads(self, x: Tensor, weight: Tensor | None) -> Tensor:
        """x [B, T, h·D] -> [B, T, h, D], through the optional per-head RMSNorm."""
        x = x.unflatten(-1, (-1, self.head_dim))
        return optional_head_norm(x, weight, self.norm_eps)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, r, k, v = self.qrkv_proj(x).split(self.widths, dim=-1)
        q, r = self._heads(q, self.q_norm_weight), self._heads(r, self.r_norm_weight)
        k = self._heads(k, self.k_norm_weight)
        q, r, k = (ctx.rotate(t).transpose(1, 2) for t in (q, r, k))  # [B, H, T, D]
        v = v.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        cache, new_state = append_cache(state, 2, k=k, v=v)
        k, v = cache["k"], cache["v"]  # [B, H_kv, past + T, D]
        past = k.shape[2] - seq_len
        bias = ctx.attention_bias(self.num_heads, past)  # [H, T, past + T] or None
        key_mask = ctx.key_mask(past)  # [B, past + T] in a padded batch (fla's kernel has no mask)
        fused = self.backend_name() == "fused"  # resolved first: backend=fused refuses on CPU
        if fused and state is None and bias is None and key_mask is None and q.dtype in HALF:
            q, r, k, v = (t.transpose(1, 2) for t in (q, r, k, v))  # [B, T, H, D]
            y = fla_op(*FUSED_KERNEL)(q, r, k.to(q.dtype), v.to(q.dtype), window_size=self.window_size)
        else:
            visible = with_key_mask(causal_mask(seq_len, past, self.window_size, x.device), key_mask, past)
            y = parallax_attention(q, r, k, v, visible, bias).transpose(1, 2)  # [B, T, H, D]
        if new_state is not None and self.window_size is not None:  # the next token sees window − 1 of these
            keep = max(0, k.shape[2] - (self.window_size - 1))
            new_state = {name: t[:, :, keep:] for name, t in new_state.items()}
        return self.out_proj(y.reshape(batch, seq_len, self.hidden_size).to(x.dtype)), new_state

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qrkv_proj.weight, FUSED_KERNEL, "mixin=parallax")

    def flops_per_token(self, seq_len: int) -> float:
        # per visible key: q·k, r·k, and the two weighted sums of v (4 · 2 · hidden), plus per key and
        # head the exp, the probe product and the two row sums
        keys = mean_keys(seq_len, self.window_size)
        return projection_flops(self) + (4 * 2 * self.hidden_size + 6 * self.num_heads) * keys

    def state_size(self, seq_len: int) -> int:
        cached = seq_len if self.window_size is None else min(seq_len, self.window_size - 1)
        return 2 * self.kv_size * cached

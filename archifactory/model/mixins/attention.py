"""Softmax attention mixins."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import append_cache, grouped_heads
from archifactory.model.norms import RMSNorm
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles
from archifactory.model.value_residual import ValueGate

ATTENTION_BACKENDS = ("auto", "sdpa", "fused", "reference")


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, scale: float | None = None
) -> Tensor:
    """Plain softmax attention. q [B, H, Tq, E], k [B, H, Tk, E], v [B, H, Tk, Ev], mask [Tq, Tk] or
    [B, 1, Tq, Tk] bool (True = attend), bias [H, Tq, Tk] (or [B, H, Tq, Tk]) additive, logits scaled by
    `scale` (default 1/sqrt(E)), in fp32 (fp64 for fp64 inputs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (tests)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if bias is not None:
        scores = scores + bias.to(dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(dtype)).to(q.dtype)


def with_key_mask(mask: Tensor, key_mask: Tensor | None, past: int) -> Tensor:
    """A query-key mask [Tq, Tk] (True = attend; the queries are the last Tq keys) restricted to the real
    keys of each row, key_mask [B, Tk]: [B, 1, Tq, Tk]. Every query keeps its own key, so a pad query,
    whose earlier keys may all be pads, still gets a finite output (pad outputs are never used)."""
    if key_mask is None:
        return mask
    ones = torch.ones_like(mask)
    own = ones.tril(diagonal=past) & ~ones.tril(diagonal=past - 1)  # query i <-> key past + i
    return mask & (key_mask[:, None, None, :] | own)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int,
    bias: Tensor | None,
    backend: str,
    scale: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Causal softmax attention shared by the attention mixins. q [B, H, Tq, E]; k [B, H_kv, Tk, E] and
    v [B, H_kv, Tk, Ev] with H_kv dividing H (grouped K/V); the queries are the last Tq of the Tk
    positions (`past` = Tk - Tq earlier ones are cached). `backend` is `reference` (explicit fp32 softmax,
    the oracle) or `sdpa`. `key_mask` [B, Tk] (True = real token) masks the pad keys of a padded batch
    (`PositionContext.key_mask`). Returns [B, H, Tq, Ev]."""
    seq_len, total, value_dim = q.shape[2], k.shape[2], v.shape[-1]
    grouped = k.shape[1] != q.shape[1]
    # query i (absolute past + i) may see keys j <= past + i
    mask = torch.ones(seq_len, total, dtype=torch.bool, device=q.device).tril(diagonal=past)
    mask = with_key_mask(mask, key_mask, past)  # [Tq, Tk], or [B, 1, Tq, Tk] with padding
    if backend == "reference":
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, Tk, E]
        return attention_reference(q, k, v, mask, bias, scale)
    # SDPA's flash kernels want one head width for q, k and v: pad v with zeros and slice the output
    # (exact: the padded columns only produce zero outputs); otherwise it falls back to the math kernel
    if q.shape[-1] > value_dim:
        v = F.pad(v, (0, q.shape[-1] - value_dim))
    if bias is None and past == 0 and key_mask is None:  # SDPA shares each K/V head across its group
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
        return y[..., :value_dim]
    float_mask = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    if bias is not None:
        float_mask = float_mask + bias.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=scale, enable_gqa=grouped)
    return y[..., :value_dim]


@register_mixin("gqa")
class GroupedQueryAttention(Mixin):
    """Causal multi-head attention with grouped key/value heads.

    MHA (Vaswani et al., "Attention Is All You Need", 2017) when num_kv_heads == num_heads, GQA (Ainslie
    et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023) when it divides it, MQA
    (Shazeer, 2019) when it is 1. Positions come from the model's scheme: rope rotates q/k, alibi adds a
    bias, additive schemes act on the embeddings. Decode state is the KV cache ([B, H_kv, T, D] each).
    In a padded batch the pad keys are masked (`PositionContext.key_mask`), also from the cache.

    Options:
        num_heads: query heads; num_kv_heads: key/value heads (None = num_heads);
        qk_norm: RMSNorm on q and k per head (OLMo 2 / Qwen 3 style); bias: biases on the projections;
        backend: `auto`/`sdpa`/`fused` (torch's scaled_dot_product_attention: flash/memory-efficient kernels on CUDA)
            or `reference` (explicit fp32 softmax, the oracle).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.num_heads = num_heads
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, "mixin=gqa")
        check_backend(backend, "mixin=gqa", ATTENTION_BACKENDS)
        self.backend = "sdpa" if backend in ("auto", "fused") else backend
        kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul (one GEMM instead of three; the same parameters as separate projections)
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * kv_size, bias=bias)
        self.kv_size = kv_size
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def value_gate(self) -> ValueGate:
        return ValueGate(self.kv_size)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        v = self.mix_first_values(v, ctx)  # model.value_residual (ResFormer); else v itself
        q = q.view(batch, seq_len, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.rotate(q), ctx.rotate(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]

        cache, new_state = append_cache(state, 2, k=k, v=v)
        k, v = cache["k"], cache["v"]  # [B, H_kv, Tk, D]
        past = k.shape[2] - seq_len
        bias = ctx.attention_bias(self.num_heads, past)  # [H, Tq, Tk] or None
        y = causal_attention(q, k, v, past, bias, self.backend, key_mask=ctx.key_mask(past))  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y), new_state

    def backend_name(self) -> str:
        return self.backend

    def flops_per_token(self, seq_len: int) -> float:
        kv_size = self.num_kv_heads * self.head_dim
        projections = 2 * self.hidden_size * (2 * self.hidden_size + 2 * kv_size)
        # q·k and p·v over the causal prefix: on average (seq_len + 1) / 2 keys per query
        attention = 2 * 2 * self.hidden_size * (seq_len + 1) / 2
        return projections + attention

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * seq_len

"""Sliding-window attention: causal softmax attention over the last `window` positions only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS, attention_reference, with_key_mask
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import append_cache, fla_backend, fla_op, grouped_heads
from archifactory.model.norms import RMSNorm
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_KERNEL = ("attn", "parallel_attn")  # fla.ops.attn.parallel_attn(..., window_size=)


def band_mask(queries: int, keys: int, past: int, window: int, device: torch.device) -> Tensor:
    """[queries, keys] bool, True = attend: query i (key index past + i) sees keys j with
    past + i - window < j <= past + i."""
    ones = torch.ones(queries, keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=past) & ~ones.tril(diagonal=past - window)


def causal_mask(queries: int, past: int, window: int | None, device: torch.device) -> Tensor:
    """[queries, past + queries] bool, True = attend: query i (key index past + i) sees the keys up to itself,
    the last `window` of them when a window is given."""
    if window is not None:
        return band_mask(queries, past + queries, past, window, device)
    return torch.ones(queries, past + queries, dtype=torch.bool, device=device).tril(diagonal=past)


def mean_keys(seq_len: int, window: int | None) -> float:
    """Keys per query averaged over a causal sequence of `seq_len` when each sees at most `window` (None: all):
    min(t, window) for t = 1..T."""
    t = max(seq_len, 1)
    w = t if window is None else window
    return (t + 1) / 2 if t <= w else (w * (w + 1) / 2 + (t - w) * w) / t


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """Softmax attention of q [..., H, Tq, E] over k, v [..., H_kv, Tk, E] under the bool `mask`
    (broadcast to [..., Tq, Tk]) and an additive `bias`: the explicit fp32 softmax (`reference`, grouped
    heads repeated) or SDPA (grouped heads shared)."""
    grouped = k.shape[-3] != q.shape[-3]
    if backend == "reference":
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
        return attention_reference(q, k, v, mask, bias)
    if bias is not None:
        mask = (
            torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf")) + bias
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int,
    window: int,
    bias: Tensor | None,
    backend: str,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Causal attention of the queries q [B, H, Tq, E] over the last `window` keys each, with k, v
    [B, H_kv, past + Tq, E] (`past` cached keys first, past < window); `key_mask` [B, past + Tq] (True =
    real token) masks the pad keys of a padded batch. Without a bias and with more queries than the
    window, blocked, O(T·window): the queries are cut into blocks of b = window / 4 and each block attends
    to the window + b keys that reach it (b / (window + b) of the work is masked out; larger blocks waste
    more, smaller ones copy the keys more often); otherwise one banded [Tq, Tk] mask."""
    batch, _, seq_len, _ = q.shape
    if bias is not None or seq_len <= window:
        mask = with_key_mask(band_mask(seq_len, k.shape[2], past, window, q.device), key_mask, past)
        return attend(q, k, v, mask, bias, backend)
    block = max(1, window // 4)
    blocks = -(-seq_len // block)
    end_pad = blocks * block - seq_len
    # keys laid out as [window - past zeros, past keys, this call's keys, end padding]: block n's queries
    # [n·b, (n+1)·b) see padded keys [n·b, n·b + W + b); local query i sees local key j for i < j <= i + W
    q = F.pad(q, (0, 0, 0, end_pad)).unflatten(2, (blocks, block)).transpose(1, 2).flatten(0, 1)

    def key_blocks(t: Tensor) -> Tensor:  # [B, H_kv, Tk, E] -> [B·N, H_kv, W + b, E]
        t = F.pad(t, (0, 0, window - past, end_pad))  # W + N·b keys
        return t.unfold(2, window + block, block).permute(0, 2, 1, 4, 3).flatten(0, 1)

    local = band_mask(block, window + block, window, window, q.device)  # i < j <= i + W
    own = band_mask(block, window + block, window, 1, q.device)  # j = i + W: the query's own key
    real = torch.ones(batch, k.shape[2], dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    real = F.pad(real, (window - past, end_pad), value=False).unfold(
        1, window + block, block
    )  # [B, N, W + b]
    mask = (local & (real[:, :, None, :] | own)).flatten(0, 1)[:, None]  # [B·N, 1, b, W + b]
    y = attend(q, key_blocks(k), key_blocks(v), mask, None, backend)  # [B·N, H, b, Ev]
    return y.unflatten(0, (batch, blocks)).transpose(1, 2).flatten(2, 3)[:, :, :seq_len]


@register_mixin("swa")
class SlidingWindowAttention(Mixin):
    """Sliding-window attention (local attention of Longformer, Beltagy et al., "Longformer: The
    Long-Document Transformer", 2020; the causal SWA layers of Mistral 7B, Jiang et al., 2023).

    Causal multi-head attention in which query t attends to keys t - window + 1 .. t only, with grouped
    key/value heads as `gqa` (MHA / GQA / MQA through num_kv_heads). Positions come from the model's
    scheme (rope rotates q/k, alibi adds a bias). Linear in the sequence length: the reference cuts the
    queries into blocks that attend to the window + block keys reaching them. Decode state:
    the last window - 1 keys and values ([B, H_kv, min(T, window - 1), d] each), so memory stays bounded.
    Usable alone or as the attention layer of a hybrid (`model.attention_mixin=swa`). In a padded batch
    the pad keys are masked (the window counts pads, which only ever precede a row's tokens); fla's kernel
    has no mask, so a padded call takes SDPA.

    Options:
        num_heads: query heads; num_kv_heads: key/value heads (None = num_heads);
        window: keys each query sees, itself included (Mistral: 4096);
        qk_norm: RMSNorm on q and k per head; bias: biases on the projections;
        backend: `auto` (fla's `parallel_attn` with `window_size` on CUDA, else SDPA), `sdpa`, `fused`,
            or `reference` (explicit fp32 softmax, the oracle).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        window: int = 512,
        qk_norm: bool = False,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        if window < 1:
            raise ArchiFactoryError(f"mixin=swa: window={window} must be >= 1 (keys each query sees)")
        self.num_heads, self.window = num_heads, window
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, "mixin=swa")
        self.backend = check_backend(backend, "mixin=swa", ATTENTION_BACKENDS)
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.rotate(q), ctx.rotate(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        cache, new_state = append_cache(state, 2, k=k, v=v)
        k, v = cache["k"], cache["v"]  # [B, H_kv, past + T, D]
        past = k.shape[2] - seq_len
        bias = ctx.attention_bias(self.num_heads, past)  # [H, T, past + T] or None
        key_mask = ctx.key_mask(past)  # [B, past + T] in a padded batch (fla's kernel has no mask: SDPA then)
        path = self.backend_name()
        if path == "fused" and state is None and bias is None and key_mask is None:
            y = fla_op(*FUSED_KERNEL)(
                *(t.transpose(1, 2).contiguous() for t in (q, k, v)),
                scale=self.head_dim**-0.5,
                window_size=self.window,
            )  # [B, T, H, D]
            return self.out_proj(y.reshape(batch, seq_len, self.hidden_size)), None
        backend = "reference" if path == "reference" else "sdpa"
        y = sliding_window_attention(q, k, v, past, self.window, bias, backend, key_mask)  # [B, H, T, D]
        if new_state is not None:  # the next token sees the last window - 1 of these
            keep = max(0, k.shape[2] - (self.window - 1))
            new_state = {name: t[:, :, keep:] for name, t in new_state.items()}
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y), new_state

    def backend_name(self) -> str:
        if self.backend in ("sdpa", "reference"):
            return self.backend
        path = fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=swa")
        return "sdpa" if path == "reference" else path

    def flops_per_token(self, seq_len: int) -> float:
        projections = 2 * self.hidden_size * (2 * self.hidden_size + 2 * self.kv_size)
        return projections + 2 * 2 * self.hidden_size * mean_keys(seq_len, self.window)  # q·k and p·v

    def state_size(self, seq_len: int) -> int:
        return 2 * self.kv_size * min(seq_len, self.window - 1)

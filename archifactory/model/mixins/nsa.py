"""Native Sparse Attention: compressed, selected and sliding-window attention mixed by per-head gates."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import append_cache, fla_backend, fla_op, grouped_heads
from archifactory.model.mixins.reference.nsa import native_sparse_attention
from archifactory.model.mixins.swa import mean_keys, sliding_window_attention
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_KERNEL = ("nsa", "parallel_nsa")  # fla.ops.nsa.parallel_nsa (compressed + selected branches)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@register_mixin("nsa")
class NativeSparseAttention(Mixin):
    """Native Sparse Attention (Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively
    Trainable Sparse Attention", 2025; fla's `NativeSparseAttention`).

    Each query head mixes three softmax attentions over the same grouped keys with sigmoid gates
    g = σ(W_g x) [H, 3]: a compressed branch over mean-pooled blocks of `block_size` keys (complete blocks
    only), a selected branch over the `block_counts` blocks its key-head group scores highest under the
    compressed attention (the first, the current and the previous block always in), and a sliding
    branch over the last `window` keys (`reference/nsa.py`). Positions come from the model's scheme
    (rope rotates q/k before pooling, as fla's layer does). Decode state: the KV cache [B, H_kv, T, d];
    the pooled blocks are recomputed from it each call (a mean per block, O(T·d)), so a decoded token sees
    exactly the blocks of the full forward. In a padded batch the blocks start at a row's first real token
    and the pad keys are masked. On CUDA fla's `parallel_nsa` runs the compressed + selected branches of
    training calls (its kernel needs H / H_kv a power of two >= 16, block_counts a power of two with
    2·block_counts <= block_size) and fla's `parallel_attn` the sliding one; other calls take the reference.

    Options:
        num_heads; num_kv_heads (null = num_heads; NSA uses 16 query heads per key head); block_size:
        tokens per compressed / selected block (64); block_counts: blocks each query selects (16, >= 3);
        window: sliding-window keys (512; 0 = no sliding branch); qkv_bias: biases on q/k/v;
        backend: `auto` (fused on CUDA, else `sdpa`), `sdpa` (the selected and sliding softmaxes in SDPA
        under their block masks), `reference` (explicit softmaxes, the oracle) or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        block_counts: int = 16,
        window: int = 512,
        qkv_bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=nsa"
        if block_size < 1 or block_counts < 3 or window < 0:
            raise ArchiFactoryError(
                f"{name}: block_size={block_size} must be >= 1, block_counts={block_counts} >= 3 (the first, "
                f"current and previous blocks are always selected) and window={window} >= 0"
            )
        self.backend = check_backend(backend, name, ATTENTION_BACKENDS)
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.block_size, self.block_counts, self.window = (
            num_heads,
            block_size,
            block_counts,
            window,
        )
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=qkv_bias)
        self.g_proj = nn.Linear(hidden_size, 3 * num_heads, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

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
        q = ctx.rotate(q.view(batch, seq_len, self.num_heads, self.head_dim))  # [B, T, H, D]
        k = ctx.rotate(k.view(batch, seq_len, self.num_kv_heads, self.head_dim))
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        gates = self.g_proj(x).view(batch, seq_len, self.num_heads, 3).sigmoid()  # (cmp, slc, swa)
        key_mask = ctx.key_mask(0 if state is None else state["k"].shape[2])
        path = self.backend_name()
        if path == "fused" and state is None and key_mask is None and self._kernel_fits():
            y = self._fused(q, k, v, gates)  # [B, T, H, D]
            return self.out_proj(y.reshape(batch, seq_len, self.hidden_size).to(x.dtype)), None
        cache, new_state = append_cache(state, 2, k=k.transpose(1, 2), v=v.transpose(1, 2))
        past = cache["k"].shape[2] - seq_len
        options = (self.block_size, self.block_counts, self.window)
        backend = "reference" if path == "reference" else "sdpa"
        y = native_sparse_attention(
            q.transpose(1, 2),
            cache["k"],
            cache["v"],
            gates.transpose(1, 2),
            past,
            options,
            key_mask,
            None,
            backend,
        )  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y.to(x.dtype)), new_state

    def _kernel_fits(self) -> bool:
        """Whether fla's NSA kernel takes this layer's shapes (its tile constraints)."""
        groups = self.num_heads // self.num_kv_heads
        return (
            is_power_of_two(groups)
            and groups >= 16
            and is_power_of_two(self.block_counts)
            and 2 * self.block_counts <= self.block_size
        )

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor) -> Tensor:
        """fla's parallel_nsa (compressed + selected) plus the gated sliding branch, [B, T, H, D] each."""
        g_cmp, g_slc, g_swa = gates.to(q.dtype).unbind(-1)
        y = fla_op(*FUSED_KERNEL)(
            q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=self.block_counts, block_size=self.block_size
        )
        if self.window == 0:
            return y
        swa = fla_op("attn", "parallel_attn")
        if swa is not None:
            o_swa = swa(q, k, v, scale=self.head_dim**-0.5, window_size=self.window)
        else:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            o_swa = sliding_window_attention(qt, kt, vt, 0, self.window, None, "sdpa").transpose(1, 2)
        return y + o_swa * g_swa.unsqueeze(-1)

    def backend_name(self) -> str:
        if self.backend in ("sdpa", "reference"):
            return self.backend
        path = fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=nsa")
        return "sdpa" if path == "reference" else path

    def flops_per_token(self, seq_len: int) -> float:
        # per query head, q·k and p·v (2 · 2 · head_dim each key) over: the complete blocks (about
        # seq_len / (2·block_size) on average), the selected keys (at most block_counts · block_size) and
        # the window; plus the mean pooling of k and v (2 · kv_size per token)
        blocks = seq_len / (2 * self.block_size)
        keys = blocks + mean_keys(seq_len, self.block_counts * self.block_size)
        if self.window:
            keys += mean_keys(seq_len, self.window)
        return projection_flops(self) + 2 * 2 * self.hidden_size * keys + 2 * self.kv_size

    def state_size(self, seq_len: int) -> int:
        return 2 * self.kv_size * seq_len

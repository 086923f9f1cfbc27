"""Mixture of Block Attention: each query attends to its own block and the top-k earlier blocks it gates."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    append_cache,
    fla_backend,
    fla_op,
    grouped_heads,
    head_rms_norm,
    optional_head_norm,
)
from archifactory.model.mixins.reference.moba import moba_attention
from archifactory.model.mixins.swa import mean_keys
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("moba", "parallel_moba")  # fla.ops.moba.parallel_moba (needs flash-attn)


@register_mixin("moba")
class MixtureOfBlockAttention(Mixin):
    """Mixture of Block Attention (Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs",
    2025; fla's `MoBA`).

    The keys are cut into blocks of `block_size`; each block's gate key is the mean of its keys. Query t
    attends, in one softmax, to its own block causally and to every key of the `topk − 1` earlier,
    complete blocks with the highest q·mean(k) (per query head; `reference/moba.py`). Then a per-head
    RMSNorm of the output (times σ of a low-rank gate with `output_gate`) and `out_proj`, as fla's layer.
    Positions come from the model's scheme (rope rotates q/k before the means). Decode state: the KV cache
    [B, H_kv, T, d]; the block means are recomputed from it each call, so decoding keeps the same sparse
    pattern and equals the full forward (fla and the paper switch to dense attention when generating;
    here a decoded token sees exactly what it saw in training). In a padded batch the blocks start at a
    row's first real token and the pad keys are masked. On CUDA fla's `parallel_moba` (it needs flash-attn)
    runs training calls; other calls take the reference.

    Options:
        num_heads; num_kv_heads (null = num_heads); block_size: keys per block (fla's moba_chunk_size, 256);
        topk: blocks per query counting its own (fla's moba_topk, 4; >= 2); qkv_bias; qk_norm: RMSNorm on
        q and k per head; output_gate: σ-gated output norm; norm_eps (1e-6); backend: `auto` (fused on CUDA
        when flash-attn is there, else `sdpa`), `sdpa` (the masked softmax in SDPA), `reference`
        (explicit softmax, the oracle) or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        block_size: int = 256,
        topk: int = 4,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        output_gate: bool = False,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=moba"
        if block_size < 1 or topk < 2:
            raise ArchiFactoryError(
                f"{name}: block_size={block_size} must be >= 1 and topk={topk} >= 2 (the query's own block "
                "counts as one)"
            )
        self.backend = check_backend(backend, name, ATTENTION_BACKENDS)
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.block_size, self.topk, self.norm_eps = num_heads, block_size, topk, norm_eps
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.gate_proj = (
            nn.Sequential(
                nn.Linear(hidden_size, self.head_dim, bias=False),
                nn.Linear(self.head_dim, hidden_size, bias=False),
            )
            if output_gate
            else None
        )

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gains

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        q = ctx.rotate(
            optional_head_norm(
                q.view(batch, seq_len, self.num_heads, self.head_dim), self.q_norm_weight, self.norm_eps
            )
        )
        k = ctx.rotate(
            optional_head_norm(
                k.view(batch, seq_len, self.num_kv_heads, self.head_dim), self.k_norm_weight, self.norm_eps
            )
        )
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        key_mask = ctx.key_mask(0 if state is None else state["k"].shape[2])
        path = self.backend_name()
        if path == "fused" and state is None and key_mask is None:
            y, new_state = self._fused(q, k, v), None  # [B, T, H, D]
        else:
            cache, new_state = append_cache(state, 2, k=k.transpose(1, 2), v=v.transpose(1, 2))
            past = cache["k"].shape[2] - seq_len
            backend = "reference" if path == "reference" else "sdpa"
            y = moba_attention(
                q.transpose(1, 2),
                cache["k"],
                cache["v"],
                past,
                self.block_size,
                self.topk,
                key_mask,
                None,
                backend,
            )
            y = y.transpose(1, 2)  # [B, T, H, D]
        gate = None if self.gate_proj is None else self.gate_proj(x)
        y = head_rms_norm(y, self.o_norm_weight, self.norm_eps, gate, "sigmoid")  # [B, T, H·D]
        return self.out_proj(y.to(x.dtype)), new_state

    def _fused(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """fla's parallel_moba on the batch packed into one varlen row (its kernel wants as many k/v heads
        as query heads: grouped heads are repeated)."""
        batch, seq_len, heads, dim = q.shape
        groups = heads // self.num_kv_heads
        k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
        packed = [t.reshape(1, batch * seq_len, heads, dim).contiguous() for t in (q, k, v)]
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seq_len
        y = fla_op(*FUSED_KERNEL)(
            *packed, cu_seqlens=cu_seqlens, max_seqlen=seq_len, chunk_size=self.block_size, topk=self.topk
        )
        return y.view(batch, seq_len, heads, dim)

    def backend_name(self) -> str:
        if self.backend in ("sdpa", "reference"):
            return self.backend
        path = fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=moba")
        if path == "fused" and importlib.util.find_spec("flash_attn") is None:
            if self.backend == "fused":
                raise ArchiFactoryError(
                    "mixin=moba: backend=fused needs flash-attn (fla's parallel_moba calls it): pip install "
                    "flash-attn, or use mixin.backend=reference"
                )
            return "sdpa"
        return "sdpa" if path == "reference" else path

    def flops_per_token(self, seq_len: int) -> float:
        # q·k and p·v per query head over its own block's prefix and the topk − 1 chosen blocks (at most
        # (topk − 1)·block_size keys, fewer early on: mean_keys caps the causal prefix at topk·block_size),
        # the gate q·mean(k) over the earlier blocks (about seq_len / (2·block_size)), the block means
        keys = mean_keys(seq_len, self.topk * self.block_size) + seq_len / (2 * self.block_size)
        return projection_flops(self) + 2 * 2 * self.hidden_size * keys + 2 * self.kv_size

    def state_size(self, seq_len: int) -> int:
        return 2 * self.kv_size * seq_len

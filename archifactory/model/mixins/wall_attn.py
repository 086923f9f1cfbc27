"""Wall attention: softmax attention whose logits decay per key channel with learned data-dependent gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.wall_attn import FUSED_KERNEL, wall_attention
from archifactory.model.mixins.swa import causal_mask, mean_keys
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

HALF = (torch.float16, torch.bfloat16)  # the fused path: bf16/fp16 training calls, as the sibling kernels


@register_mixin("wall_attn")
class WallAttention(Mixin):
    """Wall attention (Averbuch & Pai, Tilde Research, "Wall Attention", blog and kernels, 2026; fla's
    `WallAttention`).

    Full softmax attention with a learned multiplicative decay per query head and key channel: with
    g_t = logsigmoid(g_proj x_t) <= 0 [H, d] and P_t = Σ_{s<=t} g_s,
        z_ij = Σ_n q_in k_jn exp(P_in − P_jn) / √d   (j <= i),     o_i = Σ_j softmax_j(z_ij) v_j
    so each key channel fades with the distance it has travelled under its own data-dependent gate (the
    per-channel analogue of FoX's forgetting gate; `use_scalar_gate` adds FoX's per-head term
    Σ_{j<s<=i} logsigmoid(gs_proj x_s) too). The gate biases start at `gate_init_bias` (8: logsigmoid ≈
    −3e−4, near-vanilla attention). Blocked, overflow-free reference in `reference/wall_attn.py`; on CUDA
    fla's `parallel_wall_attn` runs fp16/bf16 training calls (a state, a pad mask or an additive
    positional bias take the reference). fla uses no positional embedding with it (`positional=none`);
    other schemes still apply (rope rotates q/k, alibi adds its bias). Optional per-head RMSNorm on q/k
    (per-channel gains), sigmoid output gate, grouped K/V heads, sliding window. Decode state: the KV cache
    plus the running log-decays P [B, H, T, d] (and C [B, H, T] with the scalar gate), in fp32; with a
    window, its last window − 1 positions. Pads of a padded batch are masked keys with zero gates, so a
    left-padded row's P differences are exactly the row alone's.

    Options:
        num_heads; num_kv_heads (null = num_heads); qkv_bias; qk_norm; window_size (null = full causal);
        use_output_gate (false); use_scalar_gate (false); gate_init_bias (8.0); norm_eps (1e-5); block_size:
        the reference's query block (32); backend: `auto`, `reference` or `fused`.
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
        use_output_gate: bool = False,
        use_scalar_gate: bool = False,
        gate_init_bias: float = 8.0,
        norm_eps: float = 1e-5,
        block_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=wall_attn"
        self.backend = check_backend(backend, name)
        if (window_size is not None and window_size < 1) or block_size < 1:
            raise ArchiFactoryError(f"{name}: window_size (or null) and block_size must be >= 1")
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.window_size, self.norm_eps, self.block_size = (
            num_heads,
            window_size,
            norm_eps,
            block_size,
        )
        self.kv_size = self.num_kv_heads * self.head_dim
        self.widths = [hidden_size, self.kv_size, self.kv_size]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=qkv_bias)
        self.g_proj = nn.Linear(hidden_size, hidden_size)  # per-channel log-decay (through logsigmoid)
        self.gs_proj = nn.Linear(hidden_size, num_heads) if use_scalar_gate else None
        self.o_gate_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_output_gate else None
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(hidden_size)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.kv_size)) if qk_norm else None
        with torch.no_grad():
            for bias in self._gate_biases():
                bias.fill_(gate_init_bias)

    def _gate_biases(self) -> list[nn.Parameter]:
        """The decay gates' biases: drawn here (gate_init_bias), kept by the init scheme."""
        return [m.bias for m in (self.g_proj, self.gs_proj) if m is not None]

    def init_roles(self) -> InitRoles:
        norms = [p for p in (self.q_norm_weight, self.k_norm_weight) if p is not None]
        return InitRoles(residual=(self.out_proj,), keep=(*self._gate_biases(), *norms))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        running = torch.zeros(
            batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=compute_dtype(dtype)
        )
        state = {"k": empty, "v": empty.clone(), "decay": running}
        if self.gs_proj is not None:
            state["gate"] = running[..., 0]
        return state

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        q, k = self._norm(q, self.q_norm_weight), self._norm(k, self.k_norm_weight)
        q, k = (ctx.rotate(t).transpose(1, 2) for t in (q, k))  # [B, H, T, D]
        v = v.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        g, gs = self._log_gates(x, ctx)  # [B, H, T, D], [B, H, T] or None
        fused = self.backend_name() == "fused"  # resolved first: backend=fused refuses on CPU
        bias = ctx.attention_bias(self.num_heads, 0 if state is None else state["k"].shape[2])
        if fused and state is None and bias is None and ctx.pad_mask is None and q.dtype in HALF:
            q, k, v, g = (t.transpose(1, 2) for t in (q, k, v, g))  # [B, T, H, D]
            gs = None if gs is None else gs.transpose(1, 2)
            y = fla_op(*FUSED_KERNEL)(
                q, k.to(q.dtype), v.to(q.dtype), g, g_scalar=gs, window_size=self.window_size
            )
        else:
            y, state = self._reference(q, k, v, g, gs, bias, ctx, state)
        return self.out_proj(self._output_gate(y.reshape(batch, seq_len, self.hidden_size), x)), state

    def _reference(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        gs: Tensor | None,
        bias,
        ctx,
        state: MixinState | None,
    ) -> tuple[Tensor, MixinState | None]:
        """The blocked reference over the KV cache: returns (y [B, T, H, D], the new state or None)."""
        seq_len = q.shape[2]
        fresh = {"k": k, "v": v, "decay": self._running(g, state, "decay")}
        if gs is not None:
            fresh["gate"] = self._running(gs, state, "gate")
        cache, new_state = append_cache(state, 2, **fresh)
        past = cache["k"].shape[2] - seq_len
        visible = with_key_mask(
            causal_mask(seq_len, past, self.window_size, q.device), ctx.key_mask(past), past
        )
        y = wall_attention(
            q, cache["k"], cache["v"], cache["decay"], visible, cache.get("gate"), bias, self.block_size
        )
        if new_state is not None and self.window_size is not None:  # the next token sees window − 1 of these
            keep = max(0, past + seq_len - (self.window_size - 1))
            new_state = {name: t[:, :, keep:] for name, t in new_state.items()}
        return y.transpose(1, 2), new_state

    def _running(self, g: Tensor, state: MixinState | None, name: str) -> Tensor:
        """Σ g over time (dim 2) continuing from the cached running sum's last position."""
        total = g.cumsum(2)
        if state is None or state[name].shape[2] == 0:
            return total
        return total + state[name][:, :, -1:].to(total.dtype)

    def _log_gates(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor | None]:
        """logsigmoid of the gate projections in the compute dtype, 0 at pads: g [B, H, T, D], gs [B, H, T]."""
        dtype = compute_dtype(x.dtype)
        g = zero_pads(F.logsigmoid(self.g_proj(x).to(dtype)), ctx).unflatten(-1, (-1, self.head_dim))
        if self.gs_proj is None:
            return g.transpose(1, 2), None
        return g.transpose(1, 2), zero_pads(F.logsigmoid(self.gs_proj(x).to(dtype)), ctx).transpose(1, 2)

    def _norm(self, x: Tensor, weight: Tensor | None) -> Tensor:
        """x [B, T, h·D] -> [B, T, h, D] through the optional per-head RMSNorm (per-channel gains)."""
        x = x.unflatten(-1, (-1, self.head_dim))
        return optional_head_norm(x, weight, self.norm_eps)

    def _output_gate(self, y: Tensor, x: Tensor) -> Tensor:
        return (
            y.to(x.dtype) if self.o_gate_proj is None else torch.sigmoid(self.o_gate_proj(x)) * y.to(x.dtype)
        )

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=wall_attn")

    def flops_per_token(self, seq_len: int) -> float:
        # per visible key: the decayed q·k and the weighted sum of v (2 · 2 · hidden), plus per key and head
        # the exp and the softmax; per query block, the earlier keys rescaled (exp, subtract, multiply), and
        # the in-block pairwise decays (4 per key channel) and their weighted product; the gates' logsigmoid
        length = max(seq_len, 1)
        keys = mean_keys(length, self.window_size)
        block = min(self.block_size, length)
        rescale = 3 * self.hidden_size * keys / block + 6 * self.hidden_size * (block + 1) / 2
        return projection_flops(self) + (2 * 2 * self.hidden_size + 4 * self.num_heads) * keys + rescale

    def state_size(self, seq_len: int) -> int:
        cached = seq_len if self.window_size is None else min(seq_len, self.window_size - 1)
        per_position = (
            2 * self.kv_size + self.hidden_size + (self.num_heads if self.gs_proj is not None else 0)
        )
        return per_position * cached

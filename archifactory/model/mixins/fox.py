"""Forgetting Transformer: softmax attention with a data-dependent forget gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS, causal_attention
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import append_cache, fill_pads, fla_backend, fla_op, grouped_heads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_KERNEL = ("forgetting_attn", "parallel_forgetting_attn")


@register_mixin("fox")
class ForgettingAttention(Mixin):
    """Forgetting Transformer (Lin et al., "Forgetting Transformer: Softmax Attention with a Forget Gate",
    2025).

    Causal softmax attention whose logits get the cumulative log forget gate as a bias: per head, with
    f_t = sigmoid(f_proj x_t) and c_t = Σ_{l<=t} log f_l,
        o_i = Σ_{j<=i} softmax_j(q_i·k_j / sqrt(d) + c_i − c_j) v_j
    (the forget gates of steps j+1..i down-weight key j; the diagonal is undecayed). It carries order by
    itself, so it also serves as a positional ablation (`positional=none` with it); other schemes still
    apply (rope rotates q/k, alibi adds its bias). Optional SiLU output gate and grouped K/V heads.
    Decode state: the KV cache [B, H_kv, T, d] and each cached key's c_j [B, H, T]; c of the newest token
    is the last entry. The reference materialises the [B, H, T, T] bias (SDPA with an additive mask, or
    the explicit fp32 softmax); fla's `parallel_forgetting_attn` is the fused path on CUDA. In a padded
    batch a pad forgets nothing (log f = 0) and its key is masked; the fused kernel has no mask, so a padded
    call takes SDPA.

    Options:
        num_heads; num_kv_heads (null = num_heads); use_output_gate: SiLU(g_proj x) on the output;
        backend: `auto` (fla on CUDA, else SDPA), `sdpa`, `fused` or `reference` (explicit fp32 softmax).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        use_output_gate: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.num_heads = num_heads
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, "mixin=fox")
        self.backend = check_backend(backend, "mixin=fox", ATTENTION_BACKENDS)
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=False)
        self.f_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_output_gate else None
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        gates = torch.zeros(batch_size, self.num_heads, 0, device=device, dtype=compute_dtype(dtype))
        return {"k": empty, "v": empty.clone(), "gate": gates}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        q = ctx.rotate(q.view(batch, seq_len, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = ctx.rotate(k.view(batch, seq_len, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # pads forget nothing (log f = 0), so the cached c_j of a left-padded row equal the row's alone
        log_f = fill_pads(F.logsigmoid(self.f_proj(x).to(compute_dtype(x.dtype))), ctx, 0.0).transpose(1, 2)
        gate = log_f.cumsum(-1)  # c_t within this call
        if state is not None and state["gate"].shape[-1]:  # continue the sum from the newest cached token
            gate = gate + state["gate"][..., -1:]
        cache, new_state = append_cache(state, 2, k=k, v=v, gate=gate)
        k, v, gate_keys = cache["k"], cache["v"], cache["gate"]  # [B, H_kv, Tk, D] (twice), [B, H, Tk]
        past = k.shape[2] - seq_len
        alibi = ctx.attention_bias(self.num_heads, past)  # [H, Tq, Tk] or None
        key_mask = ctx.key_mask(past)  # [B, Tk] in a padded batch (fla's kernel has no mask: SDPA then)
        if self.backend_name() == "fused" and state is None and alibi is None and key_mask is None:
            y = self._fused(q, k, v, log_f)
        else:
            bias = gate[..., :, None] - gate_keys[..., None, :]  # c_i − c_j [B, H, Tq, Tk]
            bias = bias if alibi is None else bias + alibi
            backend = "reference" if self.backend == "reference" else "sdpa"
            y = causal_attention(q, k, v, past, bias.to(q.dtype), backend, key_mask=key_mask)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        if self.g_proj is not None:
            y = y * F.silu(self.g_proj(x))
        return self.out_proj(y), new_state

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, log_f: Tensor) -> Tensor:
        kernel = fla_op(*FUSED_KERNEL)
        out = kernel(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            log_f.transpose(1, 2),
            scale=self.head_dim**-0.5,
        )  # [B, T, H, D]
        return out.transpose(1, 2)

    def backend_name(self) -> str:
        if self.backend in ("sdpa", "reference"):
            return self.backend
        # `auto` without the kernel takes SDPA (the fast unfused path), not the explicit-softmax reference
        path = fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=fox")
        return "sdpa" if path == "reference" else path

    def flops_per_token(self, seq_len: int) -> float:
        projections = projection_flops(self)
        # q·k and p·v over the causal prefix (on average (seq_len + 1) / 2 keys), plus the gate bias
        attention = 2 * 2 * self.hidden_size * (seq_len + 1) / 2 + self.num_heads * (seq_len + 1) / 2
        return projections + attention

    def state_size(self, seq_len: int) -> int:
        return (2 * self.kv_size + self.num_heads) * seq_len

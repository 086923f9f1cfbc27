"""DeltaFormer: softmax attention over values corrected by a delta rule whose kernel is softmax itself."""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    fla_backend,
    fla_op,
    grouped_heads,
    optional_head_norm,
)
from archifactory.model.mixins.reference.deltaformer import deltaformer_attention
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("deltaformer", "deltaformer_attn")  # fla.ops.deltaformer (needs flash-attn)
BETA_ACTIVATIONS = ("identity", "sigmoid")


@register_mixin("deltaformer")
class DeltaFormerAttention(Mixin):
    """DeltaFormer (Zhong et al., "Understanding Transformer from the Perspective of Associative Memory",
    2025; fla's `DeltaFormerAttention`).

    Each token writes a corrected value u_t = v_t − β_t Σ_{s<t} softmax_{s<t}(q_t·k_s/√d) u_s (a delta
    rule whose kernel is the softmax over earlier keys), then reads with causal softmax attention over the
    corrected values, o_t = Σ_{s<=t} softmax(q_t·k_s/√d) u_s (`reference/deltaformer.py`: the writes are
    one triangular solve). β_t = b_proj(x) per head (fla's layer: a linear map with a bias, no squashing;
    `beta_activation=sigmoid` bounds it to (0, 1) as in DeltaNet). Positions come from the model's scheme
    (rope rotates q/k). Grouped k/v heads; u is per query head. Decode state: the key cache [B, H_kv, T, d]
    and the corrected values [B, H, T, d] (v itself is never read again). In a padded batch the pad keys
    are masked in both softmaxes. On CUDA fla's `deltaformer_attn` (it needs flash-attn) runs training
    calls; other calls take the reference.

    Options:
        num_heads; num_kv_heads (null = num_heads); qkv_bias; qk_norm: RMSNorm on q and k per head;
        beta_activation: `identity` (fla's) or `sigmoid`; norm_eps (1e-6); backend: `auto`, `reference`
        or `fused`.
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
        beta_activation: str = "identity",
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=deltaformer"
        if beta_activation not in BETA_ACTIVATIONS:
            raise ArchiFactoryError(
                f"{name}: beta_activation={beta_activation!r} is not one of {', '.join(BETA_ACTIVATIONS)}"
            )
        self.backend = check_backend(backend, name)
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.beta_activation, self.norm_eps = num_heads, beta_activation, norm_eps
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=qkv_bias)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the q/k norm gains

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        keys = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        values = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": keys, "u": values}

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
        beta = self.b_proj(x)  # [B, T, H]
        beta = beta.sigmoid() if self.beta_activation == "sigmoid" else beta
        past = 0 if state is None else state["k"].shape[2]
        key_mask = ctx.key_mask(past)
        if self.backend_name() == "fused" and state is None and key_mask is None:
            groups = self.num_heads // self.num_kv_heads
            k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
            y = fla_op(*FUSED_KERNEL)(q=q, k=k, v=v, beta=beta)  # [B, T, H, D]
            return self.out_proj(y.reshape(batch, seq_len, self.hidden_size)), None
        k = k.transpose(1, 2)  # [B, H_kv, T, D]
        keys = k if state is None else torch.cat([state["k"], k], dim=2)
        u_past = q.new_zeros(batch, self.num_heads, 0, self.head_dim) if state is None else state["u"]
        y, u = deltaformer_attention(
            q.transpose(1, 2), keys, v.transpose(1, 2), beta.transpose(1, 2), u_past, key_mask
        )
        new_state = None if state is None else {"k": keys, "u": u.to(state["u"].dtype)}
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y.to(x.dtype)), new_state

    def backend_name(self) -> str:
        path = fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=deltaformer")
        if path == "fused" and importlib.util.find_spec("flash_attn") is None:
            if self.backend == "fused":
                raise ArchiFactoryError(
                    "mixin=deltaformer: backend=fused needs flash-attn (fla's deltaformer_attn calls it): "
                    "pip install flash-attn, or use mixin.backend=reference"
                )
            return "reference"
        return path

    def flops_per_token(self, seq_len: int) -> float:
        # over the causal prefix (on average (seq_len + 1) / 2 keys) per query head: the q·k logits (shared
        # by both softmaxes), the write Σ p u (the triangular solve costs one such product) and the read
        keys = (seq_len + 1) / 2
        return projection_flops(self) + 3 * 2 * self.hidden_size * keys

    def state_size(self, seq_len: int) -> int:
        return (self.kv_size + self.hidden_size) * seq_len

"""Simple gated linear attention: GLA with one data-dependent scalar decay per head and step.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a zero input to the short conv, k = 0 and
log-decay 0, set on the kernel's inputs (reference and fused path alike).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    ShortConvolution,
    fla_backend,
    grouped_heads,
    head_rms_norm,
    scaled_width,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, expand_heads, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("simple_gla")
class SimpleGLA(Mixin):
    """Simple GLA: gated linear attention with a head-wise gate (Yang et al., "Gated Linear Attention
    Transformers with Hardware-Efficient Training", 2024; fla's `SimpleGatedLinearAttention`, the
    data-dependent form of RetNet's and Lightning Attention's fixed decays).

    Per head, with one scalar decay per step from a per-head projection,
        log α_t = logsigmoid(gk_proj x_t) / τ (τ = gate_logit_normalizer),
        S_t = α_t S_{t-1} + k_tᵀ v_t,      o_t = q_t S_t / sqrt(d_k)
    chunked (the shared `reference/simple_gla.py`) or fla's `chunk_simple_gla` on CUDA. Short causal
    convs (+ SiLU) on q/k/v by default, as fla; key/value heads may be grouped (num_kv_heads, each shared
    by num_heads / num_kv_heads consecutive query heads). Output: per-head RMSNorm times SiLU(g_proj x),
    then out_proj. Positional schemes are ignored. Decode state: S [B, H, d_k, d_v] (+ conv buffer).

    Options:
        num_heads; num_kv_heads (null = num_heads); expand_k: key width / hidden (1);
        expand_v: value width / hidden (1); use_short_conv / conv_size;
        gate_logit_normalizer: τ (16); norm_eps; chunk_size: reference chunk length;
        backend: `auto` (fla's `chunk_simple_gla` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=simple_gla"
        if chunk_size < 1 or conv_size < 1 or gate_logit_normalizer <= 0:
            raise ArchiFactoryError(
                f"{name}: chunk_size and conv_size must be >= 1 and gate_logit_normalizer > 0"
            )
        self.backend = check_backend(backend, name)  # availability is checked per call
        _, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads, self.normalizer = num_heads, gate_logit_normalizer
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        # q for every head, k and v for the key/value heads, in one matmul
        self.widths = [self.key_dim, self.num_kv_heads * self.head_k_dim, self.num_kv_heads * self.head_v_dim]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.conv = ShortConvolution(sum(self.widths), conv_size) if use_short_conv else None
        self.gk_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the output-norm gain is drawn in the constructor; the optional short conv keeps its own init
        conv = () if self.conv is None else (self.conv,)
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), *conv))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.head_k_dim, self.head_v_dim)
        state = {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        qkv, conv_state = zero_pads(self.qkv_proj(x), ctx), None  # pads: a zero conv input
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, None if state is None else state["conv"])
        q, k, v = qkv.split(self.widths, dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_k_dim)
        k = expand_heads(k.view(batch, seq_len, self.num_kv_heads, self.head_k_dim), self.num_heads, 2)
        v = expand_heads(v.view(batch, seq_len, self.num_kv_heads, self.head_v_dim), self.num_heads, 2)
        g = F.logsigmoid(self.gk_proj(x).to(compute_dtype(x.dtype))) / self.normalizer  # [B, T, H]
        k, g = zero_pads(k, ctx), zero_pads(g, ctx)  # pads: no write, no decay
        past = None if state is None else state["recurrent"]
        out, new_state = simple_gla_forward(
            q, k, v, g, self.head_k_dim**-0.5, past, self.backend_name(), self.chunk_size
        )
        y = head_rms_norm(out, self.norm_weight, self.norm_eps, self.g_proj(x))  # [B, T, H·V]
        y = self.out_proj(y.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, "mixin=simple_gla")

    def flops_per_token(self, seq_len: int) -> float:
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        # chunked simple GLA per head and token: q·k scores and scores·v over a chunk, q·S, state update
        chunk = min(self.chunk_size, max(seq_len, 1))
        rule = self.num_heads * (
            2 * chunk * (self.head_k_dim + self.head_v_dim) + 4 * self.head_k_dim * self.head_v_dim
        )
        return projection_flops(self) + conv + rule

    def state_size(self, seq_len: int) -> int:
        conv = 0 if self.conv is None else self.conv.state_size()
        return self.num_heads * self.head_k_dim * self.head_v_dim + conv

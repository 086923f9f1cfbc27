"""BitAttention: causal softmax attention whose four projections are BitNet b1.58 ternary linears."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.attention import ATTENTION_BACKENDS, causal_attention
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, resolve_backend
from archifactory.model.mixins.kit import KernelImport, append_cache, grouped_heads, import_kernel
from archifactory.model.mixins.reference.bitlinear import bit_linear
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

# fla's fused RMSNorm + 8-bit activation quantisation + ternary linear (a module, not under fla.ops)
FUSED_MODULE, FUSED_NAME = "fla.modules.fused_bitlinear", "layer_norm_linear_quant"


@functools.cache
def fused_bit_linear() -> KernelImport:
    """fla's `layer_norm_linear_quant`, imported on first CUDA use and cached (or None and why not)."""
    return import_kernel(FUSED_MODULE, FUSED_NAME)


class BitLinear(nn.Linear):
    """A bias-free linear layer with BitNet b1.58 quantisation (`reference/bitlinear.py`): RMSNorm of the
    input with the gain `norm_weight` (held by the owner, so that the output projection alone is the
    residual writer), 8-bit per-token activations, ternary per-tensor weights, both straight-through.
    `fused` runs fla's fused kernel (CUDA) instead of the plain reference."""

    def __init__(self, in_features: int, out_features: int, eps: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.eps = eps

    def forward(self, x: Tensor, norm_weight: Tensor, fused: bool = False) -> Tensor:  # type: ignore[override]
        if fused:
            kernel = fused_bit_linear().kernel
            return kernel(x, norm_weight, None, self.weight, None, eps=self.eps, is_rms_norm=True)
        return bit_linear(x, self.weight, norm_weight, self.eps).to(x.dtype)


@register_mixin("bitattn")
class BitAttention(Mixin):
    """BitAttention (fla's `BitAttention`; the BitNet b1.58 projections of Ma et al., "The Era of 1-bit
    LLMs: All Large Language Models are in 1.58 Bits", 2024).

    `gqa` with q, k, v and the output projection each a `BitLinear`: the input RMS-normalised (its own
    gain), quantised to 8 bits per token, multiplied by the weight quantised to {−1, 0, +1} times its
    mean magnitude; straight-through in the backward, so the latent weights train in full precision.
    Softmax attention in between through the attention helper (grouped K/V heads, the model's positional
    scheme). Decode state: the KV cache ([B, H_kv, T, d] each); pad keys are masked.

    Options:
        num_heads; num_kv_heads (null = num_heads); norm_eps: the projections' RMSNorm eps (fla's 1e-8);
        backend: `auto` (fla's fused norm-quantise-linear kernel on CUDA, else the plain quantiser; SDPA
        attention), `sdpa` (plain quantiser, SDPA), `fused` (fla's kernel, SDPA) or `reference` (plain
        quantiser, explicit fp32 softmax).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        norm_eps: float = 1e-8,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=bitattn"
        self.backend = check_backend(backend, name, ATTENTION_BACKENDS)
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        self.num_heads = num_heads
        self.kv_size = self.num_kv_heads * self.head_dim
        self.q_proj = BitLinear(hidden_size, hidden_size, norm_eps)
        self.k_proj = BitLinear(hidden_size, self.kv_size, norm_eps)
        self.v_proj = BitLinear(hidden_size, self.kv_size, norm_eps)
        self.out_proj = BitLinear(hidden_size, hidden_size, norm_eps)
        # each projection's RMSNorm gain (fla's BitLinear.norm.weight), ones at init
        self.q_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.k_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.v_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.out_norm_weight = nn.Parameter(torch.ones(hidden_size))

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gains start at 1

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        path = self.backend_name()
        fused = path == "fused"
        q = self.q_proj(x, self.q_norm_weight, fused).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x, self.k_norm_weight, fused).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, self.v_norm_weight, fused).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        q, k = ctx.rotate(q), ctx.rotate(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        cache, new_state = append_cache(state, 2, k=k, v=v)
        k, v = cache["k"], cache["v"]  # [B, H_kv, Tk, D]
        past = k.shape[2] - seq_len
        bias = ctx.attention_bias(self.num_heads, past)  # [H, Tq, Tk] or None
        attention = "reference" if path == "reference" else "sdpa"
        y = causal_attention(q, k, v, past, bias, attention, key_mask=ctx.key_mask(past))  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(batch, seq_len, self.hidden_size)
        return self.out_proj(y, self.out_norm_weight, fused).to(x.dtype), new_state

    def backend_name(self) -> str:
        if self.backend in ("sdpa", "reference"):
            return self.backend
        kernel = fused_bit_linear() if self.q_proj.weight.is_cuda else None  # fla is never imported on CPU
        if self.backend == "fused" and kernel is not None and kernel.kernel is None:
            raise ArchiFactoryError(
                f"mixin=bitattn: backend=fused is unavailable: {kernel.reason}; use mixin.backend=sdpa"
            )
        path = resolve_backend(
            self.backend, kernel is not None and kernel.kernel is not None, "mixin=bitattn"
        )
        return "sdpa" if path == "reference" else path

    def flops_per_token(self, seq_len: int) -> float:
        # the four projections, their RMSNorm and 8-bit quantisation (about 6 per input element), then
        # q·k and p·v over the causal prefix (on average (seq_len + 1) / 2 keys per query)
        projections = 2 * self.hidden_size * (2 * self.hidden_size + 2 * self.kv_size)
        quantisers = 4 * 6 * self.hidden_size
        return projections + quantisers + 2 * 2 * self.hidden_size * (seq_len + 1) / 2

    def state_size(self, seq_len: int) -> int:
        return 2 * self.kv_size * seq_len

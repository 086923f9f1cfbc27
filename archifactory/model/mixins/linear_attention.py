"""Linear attention (Katharopoulos et al., 2020): a feature map instead of the softmax.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: φ(k) = 0 at a pad, so neither the state nor
the normaliser's key sum z (the ones column) moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import fla_backend, scaled_width, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FEATURE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}
NORMALIZER_EPS = 1e-10  # as fla's reference: o / (φ(q)·z + eps)


@register_mixin("linear_attention")
class LinearAttention(Mixin):
    """Linear attention (Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers
    with Linear Attention", 2020).

    The softmax similarity is replaced by a kernel φ(q)·φ(k), so causal attention becomes a recurrence
    over a matrix state S and (with the normaliser) a key sum z:
        S_t = S_{t-1} + φ(k_t)ᵀ v_t,   z_t = z_{t-1} + φ(k_t),   o_t = φ(q_t) S_t / (φ(q_t)·z_t)
    computed chunkwise as simple gated linear attention with no decay (`reference/simple_gla.py`); the
    normaliser rides along as one extra value column of ones, so z is the last column of the state. Then
    out_proj. Positional schemes are ignored. Decode state: [B, H, d_k, d_v (+1 with the normaliser)].

    Options:
        num_heads; expand_k / expand_v: key and value widths as multiples of hidden_size;
        feature_map: `elu` (elu(x) + 1, the paper's), `relu` or `identity`;
        normalize: divide by φ(q)·z (the paper's; off gives unnormalised linear attention);
        chunk_size: chunk length of the reference;
        backend: `auto` (fla's `chunk_simple_gla` with zero decay on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        feature_map: str = "elu",
        normalize: bool = True,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=linear_attention"
        if feature_map not in FEATURE_MAPS:
            raise ArchiFactoryError(
                f"{name}: feature_map={feature_map!r} is not one of {', '.join(FEATURE_MAPS)}"
            )
        if num_heads < 1 or chunk_size < 1:
            raise ArchiFactoryError(f"{name}: num_heads={num_heads} and chunk_size={chunk_size} must be >= 1")
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.chunk_size = chunk_size
        self.num_heads, self.feature_map, self.normalize = num_heads, feature_map, normalize
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 2 * self.key_dim + self.value_dim, bias=False)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        width = self.head_v_dim + int(self.normalize)
        shape = (batch_size, self.num_heads, self.head_k_dim, width)
        return {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(q).view(batch, seq_len, self.num_heads, self.head_k_dim)  # [B, T, H, K]
        k = zero_pads(phi(k).view(batch, seq_len, self.num_heads, self.head_k_dim), ctx)  # pads: no write
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)  # [B, T, H, V]
        if self.normalize:  # a column of ones: its output is φ(q)·z, its state column is z
            v = torch.cat([v, v.new_ones(batch, seq_len, self.num_heads, 1)], dim=-1)
        g = x.new_zeros(batch, seq_len, self.num_heads, dtype=compute_dtype(x.dtype))  # no decay
        past = None if state is None else state["recurrent"]
        out, new_state = simple_gla_forward(
            q, k, v, g, self.head_k_dim**-0.5, past, self.backend_name(), self.chunk_size
        )  # [B, T, H, V (+1)]
        out = out.to(compute_dtype(x.dtype))
        if self.normalize:
            out = out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS)
        y = self.out_proj(out.reshape(batch, seq_len, self.value_dim).to(x.dtype))
        return y, None if state is None else {"recurrent": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=linear_attention")

    def flops_per_token(self, seq_len: int) -> float:
        projections = (
            2 * self.hidden_size * (2 * self.key_dim + self.value_dim) + 2 * self.value_dim * self.hidden_size
        )
        width = self.head_v_dim + int(self.normalize)
        chunk = min(self.chunk_size, max(seq_len, 1))
        # chunkwise per head and token: q·k scores and scores·v over a chunk, q·S, state update
        rule = self.num_heads * (2 * chunk * (self.head_k_dim + width) + 4 * self.head_k_dim * width)
        return projections + rule

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_k_dim * (self.head_v_dim + int(self.normalize))

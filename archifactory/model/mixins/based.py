"""Based: linear attention whose feature map is the 2nd-order Taylor expansion of exp(q·k)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import check_divisible, fla_backend, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

NORMALIZER_EPS = 1e-6  # as fla's parallel_based: o / (Σ_j (1 + s_ij + s_ij²/2) + eps)


def taylor_width(feature_dim: int) -> int:
    """Width of the Taylor features of a `feature_dim` vector: 1 + d + d(d+1)/2."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_features(x: Tensor) -> Tensor:
    """φ(x) [..., taylor_width(d)] of x [..., d] with φ(q)·φ(k) = 1 + s + s²/2, s = q·k/√d: the constant
    1, x/d^¼, and the upper triangle of x xᵀ (each pair once) scaled by 1/√d off the diagonal and
    1/√(2d) on it (fla's TaylorFeatureMap, the symmetric half of the outer product)."""
    dim = x.shape[-1]
    rows, cols = torch.triu_indices(dim, dim, device=x.device)
    scale = (rows == cols).to(x.dtype) * ((2 * dim) ** -0.5 - dim**-0.5) + dim**-0.5  # in x's dtype
    quadratic = x[..., rows] * x[..., cols] * scale
    return torch.cat([torch.ones_like(x[..., :1]), x * dim**-0.25, quadratic], dim=-1)


@register_mixin("based")
class Based(Mixin):
    """Based (Arora et al., "Simple linear attention language models balance the recall-throughput
    tradeoff", 2024; fla's `BasedLinearAttention`).

    Per head, queries and keys of a small `feature_dim` d (16) are mapped by the Taylor features φ, so
    that the similarity is the 2nd-order expansion of exp(q·k/√d):
        o_t = Σ_{j<=t} (1 + s_tj + s_tj²/2) v_j / (Σ_{j<=t} (1 + s_tj + s_tj²/2) + 1e-6),  s = q·k/√d
    i.e. normalised linear attention with S_t = S_{t-1} + φ(k_t)ᵀ v_t and z_t = z_{t-1} + φ(k_t), computed
    chunkwise as simple GLA with no decay (the normaliser is one extra value column of ones); on CUDA
    fla's `chunk_simple_gla` on the features (fla's `chunk` mode of the layer). Then out_proj. No short
    conv, no gate (as fla's layer; zoology pairs it with conv layers in a hybrid). Positional schemes are
    ignored. Decode state: [B, H, 1 + d + d(d+1)/2, head_dim + 1].

    Options:
        num_heads; feature_dim: q/k width per head before the feature map (16);
        chunk_size: chunk length of the reference; backend: `auto`, `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        feature_dim: int = 16,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=based"
        if feature_dim < 1 or chunk_size < 1:
            raise ArchiFactoryError(
                f"{name}: feature_dim={feature_dim} and chunk_size={chunk_size} must be >= 1"
            )
        self.head_v_dim = check_divisible(hidden_size, num_heads, name)
        self.backend = check_backend(backend, name)
        self.num_heads, self.feature_dim, self.chunk_size = num_heads, feature_dim, chunk_size
        self.feature_width = taylor_width(feature_dim)
        self.widths = [num_heads * feature_dim, num_heads * feature_dim, hidden_size]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.feature_width, self.head_v_dim + 1)
        return {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        q = taylor_features(q.view(batch, seq_len, self.num_heads, self.feature_dim))  # [B, T, H, F]
        k = taylor_features(k.view(batch, seq_len, self.num_heads, self.feature_dim))
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)
        v = zero_pads(
            torch.cat([v, v.new_ones(batch, seq_len, self.num_heads, 1)], dim=-1), ctx
        )  # [.., V+1]; a zero pad row adds nothing to S or z
        g = x.new_zeros(batch, seq_len, self.num_heads, dtype=compute_dtype(x.dtype))  # no decay
        past = None if state is None else state["recurrent"]
        out, new_state = simple_gla_forward(q, k, v, g, 1.0, past, self.backend_name(), self.chunk_size)
        out = out.to(compute_dtype(x.dtype))
        out = out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS)  # the ones column carries Σ_j φ(q)·φ(k_j)
        y = self.out_proj(out.reshape(batch, seq_len, self.hidden_size).to(x.dtype))
        return y, None if state is None else {"recurrent": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=based")

    def flops_per_token(self, seq_len: int) -> float:
        width, features = self.head_v_dim + 1, self.feature_width
        chunk = min(self.chunk_size, max(seq_len, 1))
        # per head and token: the quadratic features of q and k, then chunked linear attention over them
        per_head = 2 * features + 2 * chunk * (features + width) + 4 * features * width
        return projection_flops(self) + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.feature_width * (self.head_v_dim + 1)

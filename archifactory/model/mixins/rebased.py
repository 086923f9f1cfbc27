"""ReBased: linear attention whose kernel is a learnable quadratic, (LayerNorm(q)·LayerNorm(k))²."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import check_divisible, fla_backend, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FEATURE_NORM_EPS = 1e-5  # the LayerNorm of q/k before the quadratic map (fla's layer_norm default)


def quadratic_features(x: Tensor) -> Tensor:
    """φ(x) [..., d(d+1)/2] of x [..., d] with φ(q)·φ(k) = (q·k)²/d: the upper triangle of x xᵀ (each
    pair once), scaled by d^-½ on the diagonal and √(2/d) off it (fla's RebasedFeatureMap)."""
    dim = x.shape[-1]
    rows, cols = torch.triu_indices(dim, dim, device=x.device)
    scale = (rows != cols).to(x.dtype) * ((2 / dim) ** 0.5 - dim**-0.5) + dim**-0.5  # in x's dtype
    return x[..., rows] * x[..., cols] * scale


@register_mixin("rebased")
class ReBased(Mixin):
    """ReBased (Aksenov et al., "Linear Transformers with Learnable Kernel Functions are Better In-Context
    Models", 2024; fla's `ReBasedLinearAttention`).

    Based (see `based`) with the Taylor kernel replaced by a learnable quadratic: q and k of a small
    `feature_dim` d per head go through a LayerNorm with a gain γ and bias β (shared by the heads), then
        o_t = Σ_{j<=t} s_tj² v_j / (Σ_{j<=t} s_tj² + eps),   s = LN(q_t)·LN(k_j)/√d
    i.e. normalised linear attention over the quadratic features φ(x) (d(d+1)/2 of them, φ(q)·φ(k) = s²),
    chunked as simple GLA with no decay (the normaliser is a column of ones); on CUDA fla's
    `chunk_simple_gla` on the features. Then out_proj. Positional schemes are ignored. Decode state:
    [B, H, d(d+1)/2, head_dim + 1]. (fla's other feature-norm combinations are not offered.)

    Options:
        num_heads; feature_dim: q/k width per head before the map (16); normalizer_eps: eps of the
        normaliser (fla's layer: 1e-5); chunk_size: chunk length of the reference; backend.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        feature_dim: int = 16,
        normalizer_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=rebased"
        if feature_dim < 1 or chunk_size < 1 or normalizer_eps < 0:
            raise ArchiFactoryError(
                f"{name}: feature_dim={feature_dim} and chunk_size={chunk_size} must be >= 1, normalizer_eps >= 0"
            )
        self.head_v_dim = check_divisible(hidden_size, num_heads, name)
        self.backend = check_backend(backend, name)
        self.num_heads, self.feature_dim, self.chunk_size = num_heads, feature_dim, chunk_size
        self.normalizer_eps = normalizer_eps
        self.feature_width = feature_dim * (feature_dim + 1) // 2
        self.widths = [num_heads * feature_dim, num_heads * feature_dim, hidden_size]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.gamma = nn.Parameter(torch.ones(feature_dim))
        self.beta = nn.Parameter(torch.zeros(feature_dim))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the feature LayerNorm's γ = 1, β = 0 are drawn in the constructor
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.feature_width, self.head_v_dim + 1)
        return {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}

    def features(self, x: Tensor) -> Tensor:
        """[B, T, H·d] -> the quadratic features of LayerNorm(x) per head [B, T, H, d(d+1)/2]."""
        x = x.view(*x.shape[:2], self.num_heads, self.feature_dim).to(compute_dtype(x.dtype))
        normed = F.layer_norm(
            x, (self.feature_dim,), self.gamma.to(x.dtype), self.beta.to(x.dtype), FEATURE_NORM_EPS
        )
        return quadratic_features(normed)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)
        # the ones column carries the normaliser; a zero pad row adds nothing to S or z
        v = zero_pads(torch.cat([v, v.new_ones(batch, seq_len, self.num_heads, 1)], dim=-1), ctx)
        g = x.new_zeros(batch, seq_len, self.num_heads, dtype=compute_dtype(x.dtype))  # no decay
        past = None if state is None else state["recurrent"]
        q, k = self.features(q), self.features(k)
        out, new_state = simple_gla_forward(
            q, k, v.to(q.dtype), g, 1.0, past, self.backend_name(), self.chunk_size
        )
        out = out.to(compute_dtype(x.dtype))
        out = out[..., :-1] / (out[..., -1:] + self.normalizer_eps)
        y = self.out_proj(out.reshape(batch, seq_len, self.hidden_size).to(x.dtype))
        return y, None if state is None else {"recurrent": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=rebased")

    def flops_per_token(self, seq_len: int) -> float:
        width, features = self.head_v_dim + 1, self.feature_width
        chunk = min(self.chunk_size, max(seq_len, 1))
        # per head and token: LayerNorm and quadratic features of q and k, chunked linear attention over them
        per_head = (
            2 * (8 * self.feature_dim + 2 * features) + 2 * chunk * (features + width) + 4 * features * width
        )
        return projection_flops(self) + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.feature_width * (self.head_v_dim + 1)

"""Multi-scale retention (RetNet).

Pads of a padded batch (`ctx.pad_mask`) are identity steps: k = 0 and log-decay 0 at a pad.
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


def retention_log_decay(num_heads: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """log(gamma_h) with gamma_h = 1 - 2^(-5-h), h = 0..H-1 (the paper's multi-scale decays), [H].
    log1p keeps the slow heads (gamma close to 1) accurate in fp32."""
    heads = torch.arange(num_heads, device=device, dtype=compute_dtype(dtype))
    return torch.log1p(-torch.pow(2.0, -5.0 - heads))


@register_mixin("retnet")
class MultiScaleRetention(Mixin):
    """Multi-scale retention (Sun et al., "Retentive Network: A Successor to Transformer for Large
    Language Models", 2023).

    Per head h, with fixed decay gamma_h = 1 - 2^(-5-h):
        o_t = sum_{s<=t} gamma_h^(t-s) (q_t · k_s / sqrt(d_k)) v_s,
    computed in the chunkwise form (parallel inside a chunk, recurrent across chunks; the simple-GLA
    reference with g = log gamma_h). Then a per-head GroupNorm, a swish gate and the output projection:
        y = out_proj(swish(x W_g) ⊙ GroupNorm_h(o)).
    q and k are rotated when positional=rope (the paper's xPos-style rotation; rope without the xPos
    length-extrapolation scale); with any other scheme retention alone carries order. Decode state: the
    [B, H, d_k, d_v] retention state. Parameters: 2·d·d_k + 3·d·d_v (8d² with the paper's defaults).

    Options:
        num_heads: retention heads (each its own decay);
        expand_k: key/query width as a multiple of hidden_size (1 in the paper);
        expand_v: value/gate width as a multiple of hidden_size (2 in the paper; 1 halves the layer);
        chunk_size: chunk length of the reference chunkwise form;
        norm_eps: epsilon of the per-head GroupNorm;
        backend: `auto` (fla's Triton `chunk_simple_gla` on CUDA when fla is installed, else reference),
            `reference` (plain PyTorch) or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        if num_heads <= 0 or chunk_size <= 0:
            raise ArchiFactoryError(
                f"mixin=retnet: num_heads={num_heads} and chunk_size={chunk_size} must both be > 0"
            )
        self.backend = check_backend(backend, "mixin=retnet")  # availability is checked per call
        self.num_heads = num_heads
        self.chunk_size = chunk_size
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, "mixin=retnet", "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, "mixin=retnet", "expand_v")
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.group_norm = nn.GroupNorm(num_heads, self.value_dim, eps=norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.head_k_dim, self.head_v_dim)
        return {"retention": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_k_dim)  # [B, T, H, K]
        k = self.k_proj(x).view(batch, seq_len, self.num_heads, self.head_k_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_heads, self.head_v_dim)  # [B, T, H, V]
        q, k = ctx.rotate(q), ctx.rotate(k)
        log_decay = retention_log_decay(self.num_heads, x.device, x.dtype)
        g = log_decay.expand(batch, seq_len, self.num_heads)  # [B, T, H]
        k, g = zero_pads(k, ctx), zero_pads(g, ctx)  # pads: no write, no decay
        past = None if state is None else state["retention"]
        out, new_state = simple_gla_forward(
            q, k, v, g, self.head_k_dim**-0.5, past, self.backend_name(), self.chunk_size
        )
        # GroupNorm over [N, C] with one group per head: [B, T, H, V] -> [B·T, H·V]
        out = self.group_norm(out.reshape(batch * seq_len, self.value_dim)).view(x.shape[:2] + (-1,))
        y = self.out_proj(F.silu(self.g_proj(x)) * out.to(x.dtype))
        return y, None if new_state is None else {"retention": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.q_proj.weight, FUSED_KERNEL, "mixin=retnet")

    def flops_per_token(self, seq_len: int) -> float:
        projections = 2 * self.hidden_size * (2 * self.key_dim + 3 * self.value_dim)
        # chunkwise form per head and token: scores and score·v over a full chunk, q·S and the state update
        chunk = min(self.chunk_size, max(seq_len, 1))
        retention = self.num_heads * (
            2 * chunk * (self.head_k_dim + self.head_v_dim) + 4 * self.head_k_dim * self.head_v_dim
        )
        return projections + retention

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_k_dim * self.head_v_dim

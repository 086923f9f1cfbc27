"""LightNet: linear attention whose keys are normalised by a running softmax over time ("additive" decay)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import check_divisible, fill_pads, fla_backend, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.abc import VOID_LOGIT
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.lightnet import FUSED_KERNEL, lightnet_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("lightnet")
class LightNetAttention(Mixin):
    """LightNet (Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with
    LightNet", 2024; fla's `LightNetAttention`).

    Linear attention with an input-dependent decay that needs no gate projection: each key channel is
    normalised by a running softmax over time, z_t = log Σ_{j<=t} exp(k_j),
        S_t = exp(z_{t−1} − z_t) S_{t−1} + exp(k_t − z_t) v_tᵀ,   o_t = S_tᵀ SiLU(q_t) / √d_k
    (chunked in `reference/lightnet.py`, on CUDA fla's `chunk_lightnet` for training calls without
    padding). The heads' outputs go through one RMSNorm over the whole width, gated by swish of a
    low-rank projection (hidden → r → hidden), then out_proj. Values span the hidden size (head size
    hidden / num_heads); keys have `expand_ratio` channels per head. Positional schemes are ignored.
    Decode state: S [B, H, d_k, d_v] and the log-normaliser z [B, H, d_k] (fp32). No short convolution
    (fla's default).

    Options:
        num_heads; expand_ratio: key channels per head (128, fla's; null = hidden / num_heads);
        gate_low_rank_dim: r (128); norm_eps (1e-6: fla's fused norm-gate-linear); chunk_size: reference
        chunk length (8: its in-chunk weights are [C, C, d_k] per head); backend: `auto`, `reference`
        or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_ratio: int | None = 128,
        gate_low_rank_dim: int = 128,
        norm_eps: float = 1e-6,
        chunk_size: int = 8,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=lightnet"
        if chunk_size < 1 or gate_low_rank_dim < 1 or (expand_ratio is not None and expand_ratio < 1):
            raise ArchiFactoryError(f"{name}: chunk_size, gate_low_rank_dim and expand_ratio must be >= 1")
        self.backend = check_backend(backend, name)
        self.head_v_dim = check_divisible(hidden_size, num_heads, name)
        self.num_heads, self.chunk_size, self.norm_eps = num_heads, chunk_size, norm_eps
        self.head_k_dim = expand_ratio or self.head_v_dim
        self.key_dim = num_heads * self.head_k_dim
        self.widths = [self.key_dim, self.key_dim, hidden_size]
        self.proj = nn.Linear(hidden_size, sum(self.widths), bias=False)  # q, k (logits), v
        self.gate_down = nn.Linear(hidden_size, gate_low_rank_dim, bias=False)
        self.gate_up = nn.Linear(gate_low_rank_dim, hidden_size, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gain, drawn above

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, dtype = self.num_heads, compute_dtype(dtype)
        shape = (batch_size, heads, self.head_k_dim)
        return {
            "recurrent": torch.zeros(*shape, self.head_v_dim, device=device, dtype=dtype),
            "normaliser": torch.full(shape, VOID_LOGIT, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v = self.proj(x).split(self.widths, dim=-1)
        heads = (batch, seq_len, self.num_heads, -1)
        q, v = F.silu(q).view(heads), zero_pads(v, ctx).view(heads)
        # a pad step: a void key logit leaves the normaliser and the memory exactly as they were
        k = fill_pads(k.to(compute_dtype(x.dtype)), ctx, VOID_LOGIT).view(heads)
        past = None if state is None else (state["recurrent"], state["normaliser"])
        # a padded call takes the reference: fla's gate would turn the jump from the void normaliser of
        # leading pads to the first real key into a −1e4 log-decay inside a chunk's cumulative sum
        path = self.backend_name()
        path = "reference" if ctx.pad_mask is not None else path
        out, new = lightnet_forward(q, k, v, past, path, self.chunk_size)
        gate = self.gate_up(self.gate_down(x))
        y = head_rms_norm(out.reshape(batch, seq_len, 1, -1), self.norm_weight, self.norm_eps, gate)
        y = self.out_proj(y.to(x.dtype))
        return y, None if new is None else {"recurrent": new[0], "normaliser": new[1]}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.proj.weight, FUSED_KERNEL, "mixin=lightnet")

    def flops_per_token(self, seq_len: int) -> float:
        chunk, dk, dv = min(self.chunk_size, max(seq_len, 1)), self.head_k_dim, self.head_v_dim
        # per head and token: the normaliser and normalised key, the in-chunk weighted scores and their
        # sum over the chunk, the state read and the state update
        per_head = 6 * dk + 4 * chunk * dk + 2 * chunk * dv + 4 * dk * dv
        return projection_flops(self) + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_k_dim * (self.head_v_dim + 1)

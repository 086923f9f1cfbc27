"""Lightning Attention (MiniMax-01): linear attention with a fixed per-head decay set by the layer's depth.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: k = 0 and log-decay 0 at a pad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import check_divisible, fla_backend, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

SCHEDULES = ("minimax", "fla")


def lightning_log_decay(
    num_heads: int,
    layer_idx: int,
    num_layers: int | None,
    schedule: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """The per-head log-decay −s_h of layer `layer_idx` of `num_layers`, [H], in the compute dtype.

    `minimax` (MiniMax-01's released model): ALiBi's slopes 2^(−8(h+1)/H) times the depth factor
    1 − l/(L − 1 + 1e-5) + 1e-5, so the first layer decays fastest and the last hardly at all.
    `fla` (fla 0.6.0's `chunk_lightning_attn`): 8h/H · (1 − l/L), head 0 never decaying.
    A layer built outside a model (num_layers None) takes the factor 1 (the first layer's schedule).
    """
    heads = torch.arange(num_heads, device=device, dtype=compute_dtype(dtype))
    if schedule == "minimax":
        depth = 1.0 if num_layers is None else 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
        return -depth * torch.pow(2.0, -8.0 * (heads + 1) / num_heads)
    depth = 1.0 if num_layers is None else 1.0 - layer_idx / num_layers
    return -depth * 8.0 / num_heads * heads


@register_mixin("lightning_attn")
class LightningAttention(Mixin):
    """Lightning Attention (MiniMax, "MiniMax-01: Scaling Foundation Models with Lightning Attention",
    2025; the TransNormerLLM line of Qin et al.; fla's `chunk_lightning_attn` op).

    Per head h, with a fixed decay λ_h = exp(−s_h) that depends on the layer's depth (`slopes`):
        q, k, v = SiLU(qkv_proj x),   S_t = λ_h S_{t-1} + k_tᵀ v_t,   o_t = q_t S_t   (no 1/√d: the
    released model's), computed by the shared simple-GLA reference (`reference/simple_gla.py`, chunked
    with the constant log-decay) or fla's `chunk_simple_gla` on CUDA (what `chunk_lightning_attn` wraps).
    Output as MiniMax-01: an RMSNorm over the whole width, times sigmoid(output_gate x), then out_proj.
    The decay needs the model's depth: the model passes `num_layers` (a model setting, not an option).
    Positional schemes are ignored (MiniMax's lightning layers take no RoPE). Decode state: S
    [B, H, d, d_v]. Parameters: 3·D·H·d + 2·D·H·d (qkv, gate, out).

    Options:
        num_heads; head_dim (null = hidden / num_heads);
        slopes: `minimax` (MiniMax-01's ALiBi slopes × depth) or `fla` (fla 0.6.0's op's schedule);
        norm_eps: output RMSNorm epsilon (1e-6, MiniMax's); chunk_size: reference chunk length;
        backend: `auto` (fla's `chunk_simple_gla` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        slopes: str = "minimax",
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        backend: str = "auto",
        num_layers: int | None = None,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=lightning_attn"
        if slopes not in SCHEDULES:
            raise ArchiFactoryError(f"{name}: slopes={slopes!r} is not one of {', '.join(SCHEDULES)}")
        if chunk_size < 1 or (head_dim is not None and head_dim < 1):
            raise ArchiFactoryError(f"{name}: chunk_size={chunk_size} and head_dim={head_dim} must be >= 1")
        self.backend = check_backend(backend, name)  # availability is checked per call
        default_dim = check_divisible(hidden_size, num_heads, name)
        self.num_heads, self.head_dim = num_heads, head_dim or default_dim
        self.slopes, self.num_layers = slopes, num_layers
        self.norm_eps, self.chunk_size = norm_eps, chunk_size
        width = num_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * width, bias=False)
        self.output_gate = nn.Linear(hidden_size, width, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.out_proj = nn.Linear(width, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gain: ones

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        return {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}

    def log_decay(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """This layer's per-head log-decay [H] (see `lightning_log_decay`)."""
        return lightning_log_decay(
            self.num_heads, self.layer_idx, self.num_layers, self.slopes, device, dtype
        )

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        qkv = F.silu(self.qkv_proj(x)).view(batch, seq_len, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B, T, H, d], heads laid out as MiniMax's
        g = self.log_decay(x.device, x.dtype).expand(batch, seq_len, self.num_heads)  # [B, T, H]
        k, g = zero_pads(k, ctx), zero_pads(g, ctx)  # pads: no write, no decay
        past = None if state is None else state["recurrent"]
        out, new_state = simple_gla_forward(q, k, v, g, 1.0, past, self.backend_name(), self.chunk_size)
        normed = head_rms_norm(out.flatten(-2)[..., None, :], self.norm_weight, self.norm_eps)  # [B, T, H·d]
        y = self.out_proj((torch.sigmoid(self.output_gate(x)) * normed).to(x.dtype))
        return y, None if state is None else {"recurrent": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, "mixin=lightning_attn")

    def flops_per_token(self, seq_len: int) -> float:
        # chunked form per head and token: q·k scores and scores·v over a chunk, q·S, the state update
        chunk = min(self.chunk_size, max(seq_len, 1))
        rule = self.num_heads * (4 * chunk * self.head_dim + 4 * self.head_dim**2)
        return projection_flops(self) + rule

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim**2

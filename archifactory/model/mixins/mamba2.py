"""Mamba2 (state-space duality).

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a zero conv input and a step size dt = 0, so
the decay exp(dt·A) is 1 and the input dt·x is 0 (on the reference and the fused path alike).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import ShortConvolution, fla_backend, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL, simple_gla_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("mamba2")
class Mamba2(Mixin):
    """Mamba2 (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
    Structured State Space Duality", 2024).

    in_proj splits into (z, x, B, C, dt); a causal depthwise conv1d (kernel `conv_kernel`) + SiLU runs over
    (x, B, C); each head has a scalar decay A = -exp(A_log) and step dt = softplus(dt + dt_bias):
        h_t = exp(A·dt_t) h_{t-1} + dt_t · B_tᵀ x_t,    y_t = C_t h_t + D ⊙ x_t
    (SSD, computed chunkwise as simple gated linear attention with q = C, k = B, v = x·dt, g = A·dt).
    Then a gated RMSNorm, y = RMSNorm(y ⊙ SiLU(z)) (per group), and out_proj. Positional schemes are
    ignored (order lives in the recurrence and the conv). Decode state: the SSM state
    [B, H, d_state, head_dim] and the conv buffer [B, conv_dim, conv_kernel - 1] of raw (x, B, C) inputs.
    Init as in mamba_ssm: A ~ U[1, 16], dt ~ log-U[dt_min, dt_max] (bias = inverse softplus), D = 1.

    Options:
        d_state: SSM state size N per head; expand: inner width = expand · hidden_size;
        head_dim: channels P per head (heads = inner width / head_dim);
        n_groups: groups of heads sharing B and C (1 = all heads share, as in the paper's default);
        conv_kernel: width of the causal depthwise conv; chunk_size: chunk length of the reference SSD;
        dt_min / dt_max: range of the initial step size; norm_eps: epsilon of the gated RMSNorm;
        backend: `auto` (fla's Triton `chunk_simple_gla` on CUDA when fla is installed, else reference),
            `reference` (plain PyTorch) or `fused`.
    """

    match_option = "d_state"  # the expansion parameter matching may re-solve
    match_head_option = "head_dim"

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        d_state: int = 128,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.inner_dim = expand * hidden_size
        if min(d_state, expand, head_dim, n_groups, conv_kernel, chunk_size) <= 0:
            raise ArchiFactoryError(
                "mixin=mamba2: d_state, expand, head_dim, n_groups, conv_kernel and chunk_size must be > 0"
            )
        if self.inner_dim % head_dim or (self.inner_dim // head_dim) % n_groups:
            raise ArchiFactoryError(
                f"mixin=mamba2: inner width expand·hidden_size={self.inner_dim} must be a multiple of "
                f"head_dim={head_dim} with a head count divisible by n_groups={n_groups}; "
                "change mixin.head_dim, mixin.expand or mixin.n_groups"
            )
        if not 0 < dt_min <= dt_max:
            raise ArchiFactoryError(f"mixin=mamba2: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.backend = check_backend(backend, "mixin=mamba2")  # availability is checked per call
        self.d_state, self.head_dim, self.n_groups = d_state, head_dim, n_groups
        self.num_heads = self.inner_dim // head_dim
        self.conv_kernel, self.chunk_size, self.norm_eps = conv_kernel, chunk_size, norm_eps
        self.conv_dim = self.inner_dim + 2 * n_groups * d_state
        self.in_proj = nn.Linear(hidden_size, self.inner_dim + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, bias=True)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(self.num_heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.inner_dim))
        self.out_proj = nn.Linear(self.inner_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # A_log, dt_bias, D and the gated-norm gain are drawn above; the conv keeps torch's init
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), self.conv1d))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        ssm_shape = (batch_size, self.num_heads, self.d_state, self.head_dim)
        dtype = compute_dtype(dtype)
        return {
            "ssm": torch.zeros(ssm_shape, device=device, dtype=dtype),
            "conv": self.conv1d.init_state(batch_size, device, dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        heads, groups = self.num_heads, self.n_groups
        z, xbc, dt = self.in_proj(x).split([self.inner_dim, self.conv_dim, heads], dim=-1)
        xbc, conv_state = self.conv1d(zero_pads(xbc, ctx), None if state is None else state["conv"])
        xs, b, c = xbc.split([self.inner_dim, groups * self.d_state, groups * self.d_state], dim=-1)
        xs = xs.reshape(batch, seq_len, heads, self.head_dim)  # [B, T, H, P]
        # B and C per group [B, T, G, N], shared by the heads of the group: simple GLA takes grouped q/k
        # (scores once per group, the per-head decays applied after)
        b = b.reshape(batch, seq_len, groups, self.d_state)
        c = c.reshape(batch, seq_len, groups, self.d_state)
        dtype = compute_dtype(x.dtype)
        dt = zero_pads(F.softplus(dt.to(dtype) + self.dt_bias.to(dtype)), ctx)  # [B, T, H]; pads: dt = 0
        log_decay = -torch.exp(self.A_log.to(dtype)) * dt  # A·dt <= 0
        y, ssm_state = simple_gla_forward(
            c, b, xs * dt[..., None].to(xs.dtype), log_decay, 1.0,
            None if state is None else state["ssm"], self.backend_name(), self.chunk_size,
        )  # fmt: skip
        y = y + xs * self.D.to(xs.dtype)[:, None]  # [B, T, H, P]
        # RMSNorm(y ⊙ SiLU(z)) per group of channels (mamba_ssm's norm_before_gate=False)
        y = head_rms_norm(
            y.reshape(batch, seq_len, groups, -1), self.norm_weight, self.norm_eps, z, gate_first=True
        )
        new_state = None if state is None else {"ssm": ssm_state, "conv": conv_state}
        return self.out_proj(y.to(x.dtype)), new_state

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.in_proj.weight, FUSED_KERNEL, "mixin=mamba2")

    def flops_per_token(self, seq_len: int) -> float:
        projections = 2 * self.hidden_size * (self.in_proj.out_features + self.inner_dim)
        conv = self.conv1d.flops_per_token()
        # chunkwise SSD per head and token: C·B scores and scores·x over a full chunk, C·h, state update
        chunk = min(self.chunk_size, max(seq_len, 1))
        ssd = self.num_heads * (2 * chunk * (self.d_state + self.head_dim) + 4 * self.d_state * self.head_dim)
        return projections + conv + ssd

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.d_state * self.head_dim + self.conv1d.state_size()

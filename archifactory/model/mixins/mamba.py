"""Mamba (Mamba-1): the selective state-space model.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a zero conv input and a step size dt = 0, so
exp(dt·A) = 1 and dt·B·x = 0 and the scan's state passes through unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import ShortConvolution, fla_backend, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.hgrn import FUSED_KERNEL, diagonal_scan
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("mamba")
class Mamba(Mixin):
    """Mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

    in_proj splits into (x, z) of width d_inner = expand · hidden; a causal depthwise conv1d (kernel
    `conv_kernel`) + SiLU runs over x; x_proj makes the selective parameters (dt_low [dt_rank], B [N],
    C [N]) per token, dt = softplus(dt_proj dt_low) [d_inner]; per channel d and state n, with
    A = -exp(A_log) [d_inner, N] (S4D-real init, A[d, n] = -(n + 1)):
        h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
        y_t[d] = Σ_n C_t[n] h_t[d, n] + D[d] x_t[d],     out = out_proj(y ⊙ SiLU(z))
    The scan is element-wise over the d_inner · N channels: the chunked diagonal scan of
    `reference/hgrn.py` (O(T · d_inner · N) like the paper's selective scan, which also materialises
    the expanded state on a CPU), or fla's `chunk_hgrn` Triton kernel on CUDA (fla's own Mamba layer
    needs mamba_ssm). Positional schemes are ignored. Decode state: h [B, d_inner · N] and the conv
    buffer [B, d_inner, conv_kernel - 1]. Init as mamba_ssm: dt ~ log-U[dt_min, dt_max] (bias = inverse
    softplus), dt_proj weight U(±dt_rank^-0.5), D = 1.

    Options:
        d_state: N, state size per channel; expand: d_inner / hidden;
        dt_rank: rank of the dt projection (null = ceil(hidden / 16), the paper's "auto");
        conv_kernel: width of the causal depthwise conv; dt_min / dt_max: range of the initial step;
        chunk_size: chunk length of the reference scan;
        backend: `auto` (fla's `chunk_hgrn` on CUDA), `reference` or `fused`.
    """

    match_option = "d_state"  # the expansion parameter matching may re-solve

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_kernel: int = 4,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.dt_rank = dt_rank or math.ceil(hidden_size / 16)
        if min(d_state, expand, self.dt_rank, conv_kernel, chunk_size) < 1:
            raise ArchiFactoryError(
                "mixin=mamba: d_state, expand, dt_rank, conv_kernel and chunk_size must be >= 1, got "
                f"{d_state}, {expand}, {dt_rank}, {conv_kernel}, {chunk_size}"
            )
        if not 0 < dt_min <= dt_max:
            raise ArchiFactoryError(f"mixin=mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.backend = check_backend(backend, "mixin=mamba")  # availability is checked per call
        self.d_state, self.inner_dim, self.chunk_size = d_state, expand * hidden_size, chunk_size
        self.in_proj = nn.Linear(hidden_size, 2 * self.inner_dim, bias=False)
        self.conv1d = ShortConvolution(self.inner_dim, conv_kernel, bias=True)
        self.x_proj = nn.Linear(self.inner_dim, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner_dim, bias=True)
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(
                torch.rand(self.inner_dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            )
            dt = dt.clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        a = torch.arange(1, d_state + 1, dtype=torch.float32).expand(self.inner_dim, d_state)
        self.A_log = nn.Parameter(a.log().contiguous())
        self.D = nn.Parameter(torch.ones(self.inner_dim))
        self.out_proj = nn.Linear(self.inner_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # A_log, D and dt_proj are drawn above; the conv keeps torch's init
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), self.dt_proj, self.conv1d))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        ssm = torch.zeros(
            batch_size, self.inner_dim * self.d_state, device=device, dtype=compute_dtype(dtype)
        )
        return {"ssm": ssm, "conv": self.conv1d.init_state(batch_size, device, dtype)}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        xs, z = self.in_proj(x).split(self.inner_dim, dim=-1)
        xs, conv_state = self.conv1d(zero_pads(xs, ctx), None if state is None else state["conv"])
        dt_low, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dtype = compute_dtype(x.dtype)
        dt = zero_pads(F.softplus(self.dt_proj(dt_low).to(dtype)), ctx)  # [B, T, d_inner]; pads: dt = 0
        xs, b, c = xs.to(dtype), b.to(dtype), c.to(dtype)
        # channels (d, n) flattened: decay dt·A, input dt·x·B, both [B, T, d_inner · N]
        log_decay = (dt[..., None] * -torch.exp(self.A_log.to(dtype))).flatten(2)
        inputs = ((dt * xs)[..., None] * b[:, :, None, :]).flatten(2)
        h, ssm_state = diagonal_scan(
            inputs, log_decay, None if state is None else state["ssm"], self.backend_name(), self.chunk_size
        )
        y = (h.view(batch, seq_len, self.inner_dim, self.d_state) @ c[..., None]).squeeze(-1)  # C_t h_t
        y = (y + xs * self.D.to(dtype)) * F.silu(z.to(dtype))
        new_state = None if state is None else {"ssm": ssm_state, "conv": conv_state}
        return self.out_proj(y.to(x.dtype)), new_state

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.in_proj.weight, FUSED_KERNEL, "mixin=mamba")

    def flops_per_token(self, seq_len: int) -> float:
        # per (channel, state) element: the decay exp and product, the input product, the scan update
        # and the C readout, about 10; then D·x and the gate per channel
        scan = 10 * self.inner_dim * self.d_state + 4 * self.inner_dim
        return projection_flops(self) + self.conv1d.flops_per_token() + scan

    def state_size(self, seq_len: int) -> int:
        return self.inner_dim * self.d_state + self.conv1d.state_size()

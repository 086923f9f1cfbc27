"""Mamba-3 (SISO): trapezoidal discretisation, data-dependent rotary state, normed and biased B/C.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a step size Δ = 0 (no decay, no write, no
turn of the angle) and a zero value, so no pad reaches the trapezoid's carried term either; the carried
key and value of a warm state are folded in at the row's first real token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import fla_backend, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.mamba3 import rotate_pairs, running_angles, trapezoid_scan
from archifactory.model.mixins.reference.simple_gla import FUSED_KERNEL
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


def first_real(ctx: PositionContext) -> Tensor | None:
    """[B, T] float, 1 at each row's first real token (None without padding: position 0)."""
    if ctx.pad_mask is None:
        return None
    mask = ctx.pad_mask
    return (mask & (mask.long().cumsum(1) == 1)).float()


@register_mixin("mamba3")
class Mamba3(Mixin):
    """Mamba-3, single-input single-output (Lahoti et al., "Mamba-3: Improved Sequence Modeling using
    State Space Principles", ICLR 2026; fla's `Mamba3` layer with `is_mimo=False`).

    in_proj splits into (z, x, B, C, Δ, A, λ, θ); no short conv. B and C [G, N] get an RMSNorm (gains
    shared by the groups) and a per-head bias (ones at init), then a data-dependent rotation: pairs of
    the first N·`rope_fraction` channels turn by φ_t = φ_{t−1} + Δ_t·π·tanh θ_t per head (a complex
    state, written as RoPE). A_t = −softplus(·) ≤ −A_floor and Δ_t = softplus(· + dt_bias) per head and
    token, λ_t = sigmoid(·); the trapezoidal rule
        h_t = e^{A_tΔ_t} h_{t−1} + (1 − λ_t) Δ_t e^{A_tΔ_t} B_{t−1} x_{t−1}ᵀ + λ_t Δ_t B_t x_tᵀ
    with y_t = h_tᵀ C_t + D x_t, chunked as simple GLA (`reference/mamba3.py`). Output: y ⊙ SiLU(z), or
    with `is_outproj_norm` a per-head RMSNorm of y gated by SiLU(z); then out_proj. Positional schemes are
    ignored. Decode state: h [B, H, N, P], the angles [B, H, A], the last rotated B [B, H, N] and x
    [B, H, P]. Init as fla / mamba_ssm: Δ ~ log-U[dt_min, dt_max] (bias = inverse softplus), D = 1.
    MIMO (`is_mimo`, TileLang kernels upstream) is not implemented.

    Options:
        d_state: N (128); expand: inner width / hidden (2); head_dim: P (64); n_groups (1); rope_fraction:
        0.5 or 1.0 of the state channels rotated; dt_min / dt_max / dt_init_floor; A_floor (1e-4);
        is_outproj_norm (false); use_bias: biases on in/out_proj; norm_eps; chunk_size (64);
        backend: `auto` (fla's `chunk_simple_gla` for the scan on CUDA), `reference` or `fused`.
    """

    match_head_option = "head_dim"

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        d_state: int = 128,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,  # noqa: N803 (fla's option name)
        is_outproj_norm: bool = False,
        use_bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=mamba3"
        self.inner_dim = expand * hidden_size
        if min(d_state, expand, head_dim, n_groups, chunk_size) <= 0:
            raise ArchiFactoryError(f"{name}: d_state, expand, head_dim, n_groups and chunk_size must be > 0")
        if self.inner_dim % head_dim or (self.inner_dim // head_dim) % n_groups:
            raise ArchiFactoryError(
                f"{name}: inner width expand·hidden_size={self.inner_dim} must be a multiple of "
                f"head_dim={head_dim} with a head count divisible by n_groups={n_groups}; "
                "change mixin.head_dim, mixin.expand or mixin.n_groups"
            )
        rotated = int(d_state * rope_fraction) // 2 * 2
        if rope_fraction not in (0.5, 1.0) or rotated < 2:
            raise ArchiFactoryError(
                f"{name}: rope_fraction={rope_fraction} with d_state={d_state} must be 0.5 or 1.0 and rotate "
                "at least one pair of state channels"
            )
        if not 0 < dt_min <= dt_max:
            raise ArchiFactoryError(f"{name}: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.d_state, self.head_dim, self.n_groups = d_state, head_dim, n_groups
        self.num_heads = self.inner_dim // head_dim
        self.num_angles, self.A_floor = rotated // 2, A_floor
        self.is_outproj_norm, self.norm_eps, self.chunk_size = is_outproj_norm, norm_eps, chunk_size
        heads = self.num_heads
        self.widths = [self.inner_dim] * 2 + [n_groups * d_state] * 2 + [heads] * 3 + [self.num_angles]
        self.in_proj = nn.Linear(hidden_size, sum(self.widths), bias=use_bias)
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.B_bias = nn.Parameter(torch.ones(heads, d_state))
        self.C_bias = nn.Parameter(torch.ones(heads, d_state))
        self.B_norm_weight = nn.Parameter(torch.ones(d_state))
        self.C_norm_weight = nn.Parameter(torch.ones(d_state))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(self.inner_dim)) if is_outproj_norm else None
        self.out_proj = nn.Linear(self.inner_dim, hidden_size, bias=use_bias)

    def init_roles(self) -> InitRoles:
        # dt_bias, the B/C biases and norm gains, D and the output-norm gain are drawn above
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, dtype = (batch_size, self.num_heads), compute_dtype(dtype)
        return {
            "ssm": torch.zeros(*heads, self.d_state, self.head_dim, device=device, dtype=dtype),
            "angle": torch.zeros(*heads, self.num_angles, device=device, dtype=dtype),
            "k": torch.zeros(*heads, self.d_state, device=device, dtype=dtype),
            "v": torch.zeros(*heads, self.head_dim, device=device, dtype=dtype),
        }

    def bc(self, t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """B or C [B, T, G·N] -> RMSNorm per group, shared by the group's heads, + the per-head bias:
        [B, T, H, N]."""
        groups = t.unflatten(-1, (self.n_groups, self.d_state))
        normed = head_rms_norm(groups, weight, self.norm_eps).view(groups.shape)
        per_head = normed.repeat_interleave(self.num_heads // self.n_groups, dim=2)
        return per_head + bias.to(per_head.dtype)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        z, xs, b, c, dt, a, trap, theta = self.in_proj(x).to(dtype).split(self.widths, dim=-1)
        xs = zero_pads(xs, ctx).unflatten(-1, (self.num_heads, self.head_dim))  # [B, T, H, P]
        dt = zero_pads(F.softplus(dt + self.dt_bias.to(dtype)), ctx)  # [B, T, H]; pads: Δ = 0
        log_decay = (-F.softplus(a)).clamp(max=-self.A_floor) * dt  # A·Δ <= 0
        angles = running_angles(theta, dt, None if state is None else state["angle"])  # [B, T, H, A]
        k = rotate_pairs(self.bc(b, self.B_norm_weight, self.B_bias), angles)
        q = rotate_pairs(self.bc(c, self.C_norm_weight, self.C_bias), angles)
        past = None if state is None else (state["ssm"], state["k"], state["v"])
        y, carried = trapezoid_scan(
            q, k, xs, log_decay, dt, torch.sigmoid(trap), first_real(ctx), past, self.backend_name(),
            self.chunk_size,
        )  # fmt: skip
        y = y.to(dtype) + xs * self.D.to(dtype)[:, None]  # [B, T, H, P]
        if self.norm_weight is None:
            y = (y * F.silu(z).view(y.shape)).flatten(2)
        else:
            y = head_rms_norm(y, self.norm_weight, self.norm_eps, z)
        out = self.out_proj(y.to(x.dtype))
        if carried is None:
            return out, None
        h, k_last, v_last = carried
        return out, {"ssm": h, "angle": angles[:, -1], "k": k_last, "v": v_last}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.in_proj.weight, FUSED_KERNEL, "mixin=mamba3")

    def flops_per_token(self, seq_len: int) -> float:
        projections = 2 * self.hidden_size * (self.in_proj.out_features + self.inner_dim)
        chunk, n, p = min(self.chunk_size, max(seq_len, 1)), self.d_state, self.head_dim
        # per head: the chunked scan (q·k scores and scores·x over a chunk, q·h, the state update), the
        # B/C norm, bias and rotation, the trapezoid's correction q·k·x and the skip
        per_head = 2 * chunk * (n + p) + 4 * n * p + 12 * n + 2 * n + 4 * p
        return projections + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        heads = self.num_heads
        return heads * (self.d_state * self.head_dim + self.num_angles + self.d_state + self.head_dim)

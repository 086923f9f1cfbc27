"""Log-linear Mamba2: Mamba2's SSD with a Fenwick-tree hierarchy of states (log-linear attention)."""

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
from archifactory.model.mixins.reference.log_linear import FUSED_KERNEL, log_linear_forward
from archifactory.model.mixins.reference.log_linear_rows import chunk_log_linear_rows
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("log_linear_mamba2")
class LogLinearMamba2(Mixin):
    """Log-linear Mamba2 (Guo et al., "Log-Linear Attention", 2025; fla's `LogLinearMamba2`).

    Mamba2 (see `mamba2`) whose single SSM state per head becomes O(log T) states: the prefix of token i
    is split into the Fenwick buckets of i, and bucket level ℓ gets a data-dependent weight
    λ_ℓ = softplus(L_ℓ · dl_ℓ) (dl from in_proj, L a per-head, per-level parameter, init 1):
        y_i = Σ_{j<=i} λ_{ℓ(i,j)}(i) · exp(A·(dt_{j+1} + … + dt_i)) · (C_i·B_j) · dt_j x_j + D ⊙ x_i
    with ℓ(i, j) = bit_length(i XOR j) on the row's positions (its real tokens counted from 0). Then, as
    Mamba2, RMSNorm(y ⊙ SiLU(z)) per group and out_proj. Positional schemes are ignored.

    Paths. A call with no state and no padding (training) puts every row at the model's positions
    [start, start + T) as Python ints: the chunked reference (`reference/log_linear.py`), or on CUDA fla's
    `chunk_log_linear_attn`. A padded call or a call with a decode state takes
    `reference/log_linear_rows.py`, where each row has its own position counter (a tensor; no host sync):
    a pad is an identity step (dt = 0, so no key/value and no decay; conv input 0) that does not advance
    the row's position, so a left- or right-padded row gets exactly the outputs, buckets and next token
    of the row run alone, and the rows of a decode step after a padded prefill each continue from their
    own position. fla's kernel has no per-row positions, hence never runs there. Decode state: one
    [d_state, head_dim] matrix per head and level ([B, H, num_levels − 1, N, P], fp32), each row's position
    ([B], long: its real tokens so far) and the conv buffer. The num_levels bound is checked on the call's
    absolute positions (pads included), an upper bound of every row's that needs no host sync.

    Options: as mamba2 (d_state, expand, head_dim, n_groups, conv_kernel, chunk_size, dt_min/dt_max,
    norm_eps, backend), plus num_levels: the λ levels (fla: 15), which bound positions to
    2^(num_levels − 1) tokens.
    """

    match_option = "d_state"
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
        num_levels: int = 15,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=log_linear_mamba2"
        self.inner_dim = expand * hidden_size
        if min(d_state, expand, head_dim, n_groups, conv_kernel, chunk_size) <= 0 or num_levels < 2:
            raise ArchiFactoryError(
                f"{name}: d_state, expand, head_dim, n_groups, conv_kernel and chunk_size must be > 0 and "
                f"num_levels >= 2"
            )
        if self.inner_dim % head_dim or (self.inner_dim // head_dim) % n_groups:
            raise ArchiFactoryError(
                f"{name}: inner width expand·hidden_size={self.inner_dim} must be a multiple of "
                f"head_dim={head_dim} with a head count divisible by n_groups={n_groups}; "
                "change mixin.head_dim, mixin.expand or mixin.n_groups"
            )
        if not 0 < dt_min <= dt_max:
            raise ArchiFactoryError(f"{name}: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.backend = check_backend(backend, name)
        self.d_state, self.head_dim, self.n_groups, self.num_levels = d_state, head_dim, n_groups, num_levels
        self.num_heads = self.inner_dim // head_dim
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.conv_dim = self.inner_dim + 2 * n_groups * d_state
        self.widths = [self.inner_dim, self.conv_dim, self.num_heads, self.num_heads * num_levels]
        self.in_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, bias=True)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(self.num_heads).uniform_(1, 16).log())
        self.L = nn.Parameter(torch.ones(self.num_heads, num_levels))  # λ = softplus(L · dl), as fla
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.inner_dim))
        self.out_proj = nn.Linear(self.inner_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # A_log, dt_bias, L, D and the gated-norm gain are drawn above; the conv keeps torch's init
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), self.conv1d))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.num_levels - 1, self.d_state, self.head_dim)
        return {
            "levels": torch.zeros(shape, device=device, dtype=compute_dtype(dtype)),
            "position": torch.zeros(batch_size, device=device, dtype=torch.long),
            "conv": self.conv1d.init_state(batch_size, device, dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        if ctx.start + seq_len > 2 ** (self.num_levels - 1):
            raise ArchiFactoryError(
                f"mixin=log_linear_mamba2: position {ctx.start + seq_len} is past the "
                f"{2 ** (self.num_levels - 1)} tokens num_levels={self.num_levels} covers; raise mixin.num_levels"
            )
        heads, groups = self.num_heads, self.n_groups
        z, xbc, dt, dl = self.in_proj(x).split(self.widths, dim=-1)
        xbc, conv_state = self.conv1d(zero_pads(xbc, ctx), None if state is None else state["conv"])
        xs, b, c = xbc.split([self.inner_dim, groups * self.d_state, groups * self.d_state], dim=-1)
        xs = xs.reshape(batch, seq_len, heads, self.head_dim)  # [B, T, H, P]
        b = b.reshape(batch, seq_len, groups, self.d_state)  # [B, T, G, N], shared by a group's heads
        c = c.reshape(batch, seq_len, groups, self.d_state)
        dtype = compute_dtype(x.dtype)
        dt = zero_pads(F.softplus(dt.to(dtype) + self.dt_bias.to(dtype)), ctx)  # [B, T, H]; pads: no step
        log_decay = -torch.exp(self.A_log.to(dtype)) * dt  # A·dt <= 0
        lam = F.softplus(self.L.to(dtype) * dl.to(dtype).view(batch, seq_len, heads, self.num_levels))
        values = xs * dt[..., None].to(xs.dtype)
        backend = self.backend_name()  # resolved (or refused) for every call, the per-row path included
        if state is None and ctx.pad_mask is None:  # every row at [start, start + T): the training path
            y = log_linear_forward(c, b, values, log_decay, lam, ctx.start, backend, self.chunk_size)
            new_state = None
        else:  # each row at its own positions: a padded call, or a decode state whose rows may differ
            y, new_state = self._forward_rows(c, b, values, log_decay, lam, ctx, state, conv_state)
        y = y + xs * self.D.to(xs.dtype)[:, None]  # [B, T, H, P]
        y = head_rms_norm(
            y.reshape(batch, seq_len, groups, -1), self.norm_weight, self.norm_eps, z, gate_first=True
        )
        return self.out_proj(y.to(x.dtype)), new_state

    def _forward_rows(
        self,
        c: Tensor,
        b: Tensor,
        v: Tensor,
        g: Tensor,
        lam: Tensor,
        ctx: PositionContext,
        state: MixinState | None,
        conv_state: Tensor | None,
    ) -> tuple[Tensor, MixinState | None]:
        """Log-linear attention with a position per row (`reference/log_linear_rows.py`) from the state's
        slots and positions, or (no state) from empty slots at the call's start, only as many as its
        positions have bits (a padded scoring call touches no slot that stays empty). Returns y and, with
        a state, the new state (slots, positions and the conv buffer `conv_state`)."""
        if state is None:  # positions stay below start + T: only the slots of those bits can fill
            count = min(self.num_levels - 1, (ctx.start + v.shape[1]).bit_length())
            slots = self.init_state(v.shape[0], v.device, v.dtype)["levels"][:, :, :count]
            position = torch.full((v.shape[0],), ctx.start, device=v.device, dtype=torch.long)
        else:
            slots, position = state["levels"], state["position"]
        y, new_slots, new_position = chunk_log_linear_rows(
            c, b, v, g, lam, position, ctx.pad_mask, slots, self.chunk_size
        )
        if state is None:
            return y, None
        return y, {"levels": new_slots.to(slots.dtype), "position": new_position, "conv": conv_state}

    def backend_name(self) -> str:
        # fla's kernel needs a power-of-two head_dim and d_state in blocks of 64
        if self.head_dim & (self.head_dim - 1) or self.d_state % 64:
            if self.backend == "fused":
                raise ArchiFactoryError(
                    f"mixin=log_linear_mamba2: backend=fused needs a power-of-two head_dim and d_state a "
                    f"multiple of 64, got {self.head_dim} and {self.d_state}; change them or use "
                    "mixin.backend=reference"
                )
            return "reference"
        return fla_backend(self.backend, self.in_proj.weight, FUSED_KERNEL, "mixin=log_linear_mamba2")

    def flops_per_token(self, seq_len: int) -> float:
        projections = 2 * self.hidden_size * (self.in_proj.out_features + self.inner_dim)
        chunk = min(self.chunk_size, max(seq_len, 1))
        n, p = self.d_state, self.head_dim
        # per head and token: C·B scores and scores·x over a chunk; C read against the set slots (on average
        # half of the position's bits); the chunk's B·x outer product; the slots' decay and merge per chunk
        levels = max(seq_len, 1).bit_length()
        per_head = 2 * chunk * (n + p) + levels * n * p + 2 * n * p + 2 * levels * n * p / chunk
        return projections + self.conv1d.flops_per_token() + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        slots = self.num_heads * (self.num_levels - 1) * self.d_state * self.head_dim
        return slots + 1 + self.conv1d.state_size()  # + the row's position

"""MesaNet: a linear-time layer whose output solves a ridge regression over the past (the mesa layer).

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a zero conv input, β = 0 (neither the key
covariance H nor G is written) and log-decay 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    ShortConvolution,
    check_divisible,
    fla_backend,
    fla_op,
    head_rms_norm,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.mesa_net import chunk_mesa, mesa_step
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_KERNEL = ("mesa_net", "chunk_mesa_net")


@register_mixin("mesa_net")
class MesaNet(Mixin):
    """MesaNet (von Oswald et al., "MesaNet: Sequence Modeling by Locally Optimal Test-Time Training",
    2025).

    Each head keeps the sufficient statistics of a decayed, weighted least-squares fit of values on keys,
        H_t = γ_t H_{t-1} + β_t k_t k_tᵀ,      G_t = γ_t G_{t-1} + β_t k_t v_tᵀ,
    and answers each query with the fitted map: o_t = G_tᵀ (H_t + diag λ)⁻¹ q_t — the optimal linear
    memory for everything seen so far, not one gradient step (DeltaNet) towards it. The solve is
    `cg_steps` conjugate-gradient iterations from zero (as fla's kernel: accurate to ~1e-3, its 1e-5
    guards limit it), differentiated through by autograd in the reference. γ_t = sigmoid(a_proj x_t),
    β_t = sigmoid(b_proj x_t) (both projections with a bias), λ = softplus(λ_raw) + `lambda_lower_bound`
    per channel (init λ = 1). q, k: short causal conv + SiLU, L2-normalised per head; v = v_proj x as is.
    Output: per-head RMSNorm (gated by SiLU(g_proj x) with `use_output_gate`), out_proj. Positional schemes
    are ignored. Decode state: H [B, H, d, d], G [B, H, d, d] and the conv buffer. Parameters: 4d² (5d²
    with the gate) + 2(d + 1)·H + d + conv.

    Options:
        num_heads (d = hidden / num_heads for keys and values); use_output_gate; conv_size: kernel of
        the q/k conv; norm_eps; lambda_lower_bound: the ridge's floor; cg_steps: CG iterations (fla: 30,
        training and decoding; the same count in both keeps decoding equal to the full forward);
        chunk_size: chunk length of the reference; backend: `auto` (fla's `chunk_mesa_net` on CUDA for
        prefill and training; decoding steps in PyTorch), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        use_output_gate: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        lambda_lower_bound: float = 0.25,
        cg_steps: int = 30,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=mesa_net"
        self.head_dim = check_divisible(hidden_size, num_heads, name)
        if chunk_size < 1 or conv_size < 2 or cg_steps < 1 or not 0 < lambda_lower_bound < 1:
            raise ArchiFactoryError(
                f"{name}: need chunk_size >= 1, conv_size >= 2, cg_steps >= 1 and 0 < lambda_lower_bound < 1; "
                f"got {chunk_size}, {conv_size}, {cg_steps}, {lambda_lower_bound}"
            )
        self.backend = check_backend(backend, name)
        self.num_heads, self.chunk_size, self.cg_steps = num_heads, chunk_size, cg_steps
        self.norm_eps, self.lambda_lower_bound = norm_eps, lambda_lower_bound
        self.qk_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.conv = ShortConvolution(2 * hidden_size, conv_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        # λ = softplus(raw) + lower bound starts at 1 (fla's init)
        raw = math.log(math.expm1(1.0 - lambda_lower_bound))
        self.lambda_params = nn.Parameter(torch.full((hidden_size,), raw))
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_output_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # λ and the norm gain are set here; the conv keeps its own init; a_proj/b_proj take the scheme's
        return InitRoles(residual=(self.out_proj,), keep=(self.lambda_params, self.norm_weight, self.conv))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        dtype = compute_dtype(dtype)
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        return {
            "kk": torch.zeros(shape, device=device, dtype=dtype),
            "kv": torch.zeros(shape, device=device, dtype=dtype),
            "conv": self.conv.init_state(batch_size, device, dtype),
        }

    def ridge(self, dtype: torch.dtype) -> Tensor:
        """λ [H, d], >= lambda_lower_bound."""
        lamb = F.softplus(self.lambda_params.to(dtype)) + self.lambda_lower_bound
        return lamb.view(self.num_heads, self.head_dim)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        qk, conv_state = self.conv(zero_pads(self.qk_proj(x), ctx), None if state is None else state["conv"])
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q, k = (l2_normalize(t.reshape(shape)) for t in qk.chunk(2, dim=-1))  # [B, T, H, d]
        v = self.v_proj(x).reshape(shape)
        g = zero_pads(F.logsigmoid(self.a_proj(x).to(dtype)), ctx)  # [B, T, H]; pads: no decay
        beta = zero_pads(torch.sigmoid(self.b_proj(x).to(dtype)), ctx)  # pads: no write
        lamb = self.ridge(dtype)
        past = None if state is None else (state["kk"], state["kv"])
        if past is not None and seq_len == 1:
            out, (h_kk, h_kv) = mesa_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, self.cg_steps, past
            )
            out = out[:, None]
        elif self.backend_name() == "fused":
            out, (h_kk, h_kv) = self._fused(q, k, v, g, beta, lamb, past)
        else:
            out, (h_kk, h_kv) = chunk_mesa(q, k, v, g, beta, lamb, self.cg_steps, past, self.chunk_size)
        out = head_rms_norm(
            out, self.norm_weight, self.norm_eps, None if self.g_proj is None else self.g_proj(x)
        )
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        return y, {"kk": h_kk.to(state["kk"].dtype), "kv": h_kv.to(state["kv"].dtype), "conv": conv_state}

    def _fused(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, past: tuple | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        kernel = fla_op(*FUSED_KERNEL)
        h_kk, h_kv = (None, None) if past is None else (s.float() for s in past)
        out, h_kk, h_kv = kernel(
            q=q, k=k, v=v, g=g.float(), beta=beta.float(), lamb=lamb.float(), h_kk_init=h_kk, h_kv_init=h_kv,
            output_final_state=past is not None, max_CG_iteration=self.cg_steps,
        )  # fmt: skip
        return out, (h_kk, h_kv)

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qk_proj.weight, FUSED_KERNEL, "mixin=mesa_net")

    def flops_per_token(self, seq_len: int) -> float:
        # per head and token (d = head size, C = chunk): per CG iteration the carried-state product (2d²),
        # the in-chunk scores and their product (4Cd) and the vector updates (~10d); the read-out (2d² +
        # 4Cd) and the chunk-end state updates of H and G (4d²)
        chunk = min(self.chunk_size, max(seq_len, 1))
        d = self.head_dim
        solve = self.cg_steps * (2 * d * d + 4 * chunk * d + 10 * d)
        rule = self.num_heads * (solve + 6 * d * d + 4 * chunk * d)
        return projection_flops(self) + self.conv.flops_per_token() + rule

    def state_size(self, seq_len: int) -> int:
        return 2 * self.num_heads * self.head_dim * self.head_dim + self.conv.state_size()

"""Momentum DeltaNet: the delta rule with a momentum state, on the delta-rule layer body of `deltanet.py`.

The layer shape is fla's `MomentumDeltaNet` (fused q/k/v projection, short conv + SiLU, L2-normalised
q/k, Mamba2-style decays, gated per-head RMSNorm, out_proj); the recurrence is
`reference/momentum_delta_rule.py`'s chunked form (two states S and M), on CUDA fla's
`chunk_momentum_delta_rule` (half precision; fla's token-loop `fused_recurrent_momentum_delta_rule` for
fp32, which fla's chunked function refuses). Pads of a padded batch are identity steps: a zero input to
the short conv, η = 0 (no momentum write), μ = α = 1 and β = 0 (no decay, no state update).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import MixinState, projection_flops
from archifactory.model.mixins.deltanet import DeltaRuleMixin
from archifactory.model.mixins.kit import HeadDecay, fla_op, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.momentum_delta_rule import (
    chunk_momentum_delta_rule,
    momentum_delta_rule_step,
)
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_CHUNK = ("momentum_delta_rule", "chunk_momentum_delta_rule")
FUSED_RECURRENT = ("momentum_delta_rule", "fused_recurrent_momentum_delta_rule")
# fla's chunked form exponentiates sums that can be positive (up to −min_log_mu per token of a chunk):
# chunks of 16 keep them far inside fp32's range
FUSED_CHUNK_SIZE = 16


@register_mixin("momentum_deltanet")
class MomentumDeltaNet(DeltaRuleMixin):
    """Momentum DeltaNet (fla's `MomentumDeltaNet`, arXiv 2605.05838): the delta rule as a gradient step
    with heavy-ball momentum on a second state M.

    Per head, with L2-normalised q/k (after a short causal conv + SiLU), η_t = tanh(e_proj x_t / τ) + 1
    (τ = sqrt(hidden / tau_factor)), θ_t = arctan(η_t · exp(log_factor)), and two Mamba2-style decays
    (the kit's `HeadDecay`: `mu_decay` has fla's Mu_log, m_proj, mu_bias; `head_decay` its A_log, a_proj,
    dt_bias)
        log μ_t = max(−exp(Mu_log) · softplus(m_proj x_t + mu_bias), min_log_mu),
        log α_t = −exp(A_log) · softplus(a_proj x_t + dt_bias) + log cos² θ_t,   β_t = sin² θ_t · sigmoid(b_proj x_t),
    the recurrence is
        w_t = S_{t-1}ᵀ p_t − v_t,   M_t = μ_t M_{t-1} + η_t k_t w_tᵀ,   S_t = α_t S_{t-1} − β_t M_t,
        o_t = S_tᵀ q̃_t / sqrt(d_k),   p_t = α_t k_t (`use_p_times_alpha`, else k_t),
    with the output correction q̃ = normalise(q − exp(D_log) k) (`use_output_correction`). Output: per-head
    RMSNorm (SiLU-gated by g_proj x with `use_gate`), out_proj. Init (fla's): A, Mu ~ U[0, 16],
    dt_bias = mu_bias ~ softplus⁻¹(log-U[0.001, 0.1]), exp(log_factor) ~ U[0, 4], exp(D_log) ~ U[0, 1].
    Decode state: S and M [B, H, d_k, d_v] and the conv buffer.

    Options:
        num_heads (d_k = hidden / num_heads); expand_v: d_v = d_k · expand_v; use_short_conv / conv_size;
        use_gate: SiLU output gate; use_beta: β's sigmoid(b_proj x) factor (else 1); allow_neg_eigval:
        β doubled; use_p_times_alpha; use_output_correction; min_log_mu: floor of log μ (null: none);
        tau_factor; norm_eps; chunk_size: chunk length of the reference; backend: `auto` (fla's
        `chunk_momentum_delta_rule` on CUDA), `reference` or `fused`.
    """

    fused_kernel = FUSED_RECURRENT

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_v: float = 2.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = True,
        use_beta: bool = True,
        allow_neg_eigval: bool = False,
        use_p_times_alpha: bool = True,
        use_output_correction: bool = True,
        min_log_mu: float | None = -2.0,
        tau_factor: float = 1.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
            head_decay=(0.0, 16.0),
        )  # fmt: skip
        if tau_factor <= 0 or (min_log_mu is not None and min_log_mu >= 0):
            raise ArchiFactoryError(
                f"mixin=momentum_deltanet: need tau_factor > 0 and min_log_mu < 0 (or null), "
                f"got {tau_factor}, {min_log_mu}"
            )
        self.use_beta, self.use_p_times_alpha, self.min_log_mu = use_beta, use_p_times_alpha, min_log_mu
        self.tau = math.sqrt(hidden_size / tau_factor)
        # log μ has α's form (the kit's HeadDecay) before its floor; fla starts both dt biases from one draw
        self.mu_decay = HeadDecay(hidden_size, num_heads, (0.0, 16.0))
        with torch.no_grad():
            self.mu_decay.dt_bias.copy_(self.head_decay.dt_bias)
        self.e_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.log_factor = nn.Parameter(torch.empty(num_heads).uniform_(0, 4).log())
        self.D_log = (
            nn.Parameter(torch.empty(num_heads).uniform_(0, 1).log()) if use_output_correction else None
        )

    def init_roles(self) -> InitRoles:
        roles = super().init_roles()
        return replace(roles, keep=(*roles.keep, *self.mu_decay.init_keep()))

    def coefficients(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log α, log μ, β, η), each [B, T, H] in the compute dtype, pads made identity steps."""
        dtype = compute_dtype(x.dtype)
        eta = torch.tanh(self.e_proj(x).to(dtype) / self.tau) + 1
        log_mu = self.mu_decay(x)
        if self.min_log_mu is not None:
            log_mu = log_mu.clamp(min=self.min_log_mu)
        theta = torch.atan(eta * self.log_factor.to(dtype).exp())
        log_alpha = self.head_decay(x) + torch.cos(theta).square().log()
        beta = torch.sin(theta).square()
        if self.use_beta:
            beta = beta * torch.sigmoid(self.b_proj(x).to(dtype))
        if self.allow_neg_eigval:
            beta = 2 * beta
        return zero_pads(log_alpha, ctx), zero_pads(log_mu, ctx), zero_pads(beta, ctx), zero_pads(eta, ctx)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        state = super().init_state(batch_size, device, dtype)
        state["momentum"] = torch.zeros_like(state["recurrent"])
        return state

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        qkv = zero_pads(self.qkv_proj(x), ctx)  # pads: a zero input to the short conv
        conv_state = None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, None if state is None else state["conv"])
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        v = self.mix_first_values(v, ctx)  # model.value_residual (ResFormer); else v itself
        q = q.reshape(batch, seq_len, self.num_heads, self.head_k_dim)  # [B, T, H, K]
        k = k.reshape(batch, seq_len, self.num_heads, self.head_k_dim)
        v = v.reshape(batch, seq_len, self.num_heads, self.head_v_dim)  # [B, T, H, V]
        if self.D_log is not None:  # the output correction reads the raw (unnormalised) key, as fla
            q = (q - self.D_log.exp()[:, None] * k).to(k.dtype)
        q, k = l2_normalize(q), l2_normalize(k)
        log_alpha, log_mu, beta, eta = self.coefficients(x, ctx)
        past = None if state is None else (state["recurrent"], state["momentum"])
        if self.backend_name() == "fused" and not (past is not None and seq_len == 1):
            out, new_state = self._fused_momentum(q, k, v, log_alpha, log_mu, beta, eta, past)
        else:
            k_eta = k * eta[..., None].to(k.dtype)  # η folded into the written key
            p = k * log_alpha.exp()[..., None].to(k.dtype) if self.use_p_times_alpha else k
            args = (q, k_eta, v, p, log_alpha, log_mu, beta)
            if past is not None and seq_len == 1:
                out, new_state = momentum_delta_rule_step(*(t[:, 0] for t in args), past)
                out = out[:, None]
            else:
                out, new_state = chunk_momentum_delta_rule(
                    *args, None, past, past is not None, self.chunk_size
                )
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.output_gate(x), self.gate_activation)
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state[0], "momentum": new_state[1]}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def _fused_momentum(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_alpha: Tensor,
        log_mu: Tensor,
        beta: Tensor,
        eta: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """fla's chunked function in half precision (it refuses fp32), its token loop otherwise."""
        half = q.dtype in (torch.float16, torch.bfloat16)
        kernel = fla_op(*(FUSED_CHUNK if half else FUSED_RECURRENT))
        extra = {"chunk_size": FUSED_CHUNK_SIZE} if half else {}
        v = v.to(q.dtype)
        out, final = kernel(
            q=q, k=k, v=v, log_alpha=log_alpha.float(), log_mu=log_mu.float(), p=k, beta=beta.float(),
            eta=eta.float(), initial_state=None if past is None else torch.stack(past).float(),
            output_final_state=past is not None, use_qk_l2norm_in_kernel=False,
            use_p_times_alpha=self.use_p_times_alpha, **extra,
        )  # fmt: skip
        if past is None:
            return out, None
        return out, (final[0].to(past[0].dtype), final[1].to(past[1].dtype))

    def flops_per_token(self, seq_len: int) -> float:
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        # chunked momentum rule per head and token: the two C×C pair-decay products for Γ and b (2C²),
        # the p·k and q·k scores (4CK), the solve (C³/3 per chunk) and its right-hand sides (4CK + 2CV),
        # the q·Γk product with the errors (2CV), and per token the error read S p, the output reads of
        # S and M, the writes into S and M and the three-matrix error W = w_s S − w_m M − w_v (12KV)
        chunk = min(self.chunk_size, max(seq_len, 1))
        k_dim, v_dim = self.head_k_dim, self.head_v_dim
        rule = self.num_heads * (
            2 * chunk * chunk
            + 8 * chunk * k_dim
            + 4 * chunk * v_dim
            + 2 * chunk * chunk / 3
            + 12 * k_dim * v_dim
        )
        return projection_flops(self) + conv + rule

    def state_size(self, seq_len: int) -> int:
        return super().state_size(seq_len) + self.num_heads * self.head_k_dim * self.head_v_dim

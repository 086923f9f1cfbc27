"""Preconditioned DeltaNet: Gated DeltaNet and KDA whose write key is rescaled by a diagonal curvature
estimate (the "ATK" preconditioner), on the delta-rule layer body of `deltanet.py`.

Both layers share the body below: fused q/k/v projection, short conv + SiLU, L2-normalised q/k,
β = sigmoid(b_proj x), the preconditioner's own per-head decay g^A (`atk_decay`, the kit's `HeadDecay`:
−exp(A_log) · softplus(a_proj x + dt_bias)) and rate β^A = sigmoid(b_atk_proj x), a per-head centre
`log_atk_scale`, the recurrence of `reference/precond_delta_rule.py` (fla's
`chunk_precond_gated_delta_rule` / `chunk_precond_kda` on CUDA), a per-head RMSNorm and out_proj. They
differ in the delta rule's decay (one scalar per head, one per channel) and the output gate. Pads of a
padded batch are identity steps: a zero conv input, β = β^A = 0 (no write into S or A) and log-decays 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import MixinState
from archifactory.model.mixins.deltanet import DeltaRuleMixin
from archifactory.model.mixins.kit import HeadDecay, fla_op, head_rms_norm, low_rank_gate, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.precond_delta_rule import (
    chunk_precond_delta_rule,
    precond_delta_rule_step,
)
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles


class PrecondDeltaRuleMixin(DeltaRuleMixin):
    """Shared body of the preconditioned delta-rule mixers (not registered itself)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        layer_idx: int,
        num_heads: int,
        expand_v: float,
        use_short_conv: bool,
        conv_size: int,
        use_gate: bool,
        allow_neg_eigval: bool,
        squash_x: float,
        squash_eps: float,
        log_atk_scale_init: float,
        atk_a_init: tuple[float, float],
        norm_eps: float,
        chunk_size: int,
        backend: str,
        head_decay: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
            head_decay=head_decay,
        )  # fmt: skip
        if squash_x < 1 or squash_eps <= 0:
            raise ArchiFactoryError(
                f"mixin={self.registry_name}: need squash_x >= 1 (the preconditioner's range [1/x, x]; "
                f"<= 2 for stability) and squash_eps > 0, got {squash_x}, {squash_eps}"
            )
        self.squash_x, self.squash_eps = squash_x, squash_eps
        self.atk_decay = HeadDecay(hidden_size, num_heads, atk_a_init)
        self.b_atk_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.log_atk_scale = nn.Parameter(torch.full((num_heads,), log_atk_scale_init))

    def init_roles(self) -> InitRoles:
        roles = super().init_roles()
        return replace(roles, keep=(*roles.keep, *self.atk_decay.init_keep()))

    def atk_coefficients(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """(g^A, β^A) [B, T, H] in the compute dtype, pads made identity steps."""
        beta_atk = torch.sigmoid(self.b_atk_proj(x).to(compute_dtype(x.dtype)))
        return zero_pads(self.atk_decay(x), ctx), zero_pads(beta_atk, ctx)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        state = super().init_state(batch_size, device, dtype)
        state["preconditioner"] = state["recurrent"].new_zeros(batch_size, self.num_heads, self.head_k_dim)
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
        heads = (batch, seq_len, self.num_heads)
        q, k = q.reshape(*heads, self.head_k_dim), k.reshape(*heads, self.head_k_dim)  # [B, T, H, K]
        v = v.reshape(*heads, self.head_v_dim)  # [B, T, H, V]
        beta = zero_pads(torch.sigmoid(self.b_proj(x).to(compute_dtype(x.dtype))), ctx)  # [B, T, H]
        if self.allow_neg_eigval:
            beta = 2 * beta
        g = zero_pads(self.log_decay(x), ctx)  # [B, T, H] or [B, T, H, K]
        g_atk, beta_atk = self.atk_coefficients(x, ctx)
        past = None if state is None else (state["recurrent"], state["preconditioner"])
        if self.backend_name() == "fused" and not (past is not None and seq_len == 1):
            out, new_state = self._fused_precond(q, k, v, g, beta, g_atk, beta_atk, past)
        else:
            args = (l2_normalize(q), l2_normalize(k), v, g, beta, g_atk, beta_atk)
            squash = (self.log_atk_scale, self.squash_x, self.squash_eps)
            if past is not None and seq_len == 1:
                out, new_state = precond_delta_rule_step(*(t[:, 0] for t in args), *squash, past)
                out = out[:, None]
            else:
                out, new_state = chunk_precond_delta_rule(
                    *args, *squash, past, past is not None, self.chunk_size
                )
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.output_gate(x), self.gate_activation)
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state[0], "preconditioner": new_state[1]}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def _fused_precond(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        beta: Tensor,
        g_atk: Tensor,
        beta_atk: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """fla's kernel on the raw q/k (it L2-normalises them itself)."""
        kernel = fla_op(*self.fused_kernel)
        out, s_state, a_state = kernel(
            q=q, k=k, v=v.to(q.dtype), g=g.float().contiguous(), beta=beta.to(q.dtype),
            g_atk=g_atk.float().contiguous(), beta_atk=beta_atk.to(q.dtype),
            initial_state=None if past is None else past[0].float(),
            initial_A_state=None if past is None else past[1].float(), output_final_state=past is not None,
            x=self.squash_x, eps=self.squash_eps, log_atk_scale=self.log_atk_scale.float(),
        )  # fmt: skip
        if past is None:
            return out, None
        return out, (s_state.to(past[0].dtype), a_state.to(past[1].dtype))

    def flops_per_token(self, seq_len: int) -> float:
        # the chunked delta rule's count (the read key replaces k in the k·k scores and W_k: same cost),
        # plus the preconditioner's scan, squash and write-key product, about 10 per key channel
        return super().flops_per_token(seq_len) + 10 * self.num_heads * self.head_k_dim

    def state_size(self, seq_len: int) -> int:
        return super().state_size(seq_len) + self.num_heads * self.head_k_dim


@register_mixin("precond_gated_deltanet")
class PrecondGatedDeltaNet(PrecondDeltaRuleMixin):
    """Preconditioned Gated DeltaNet (fla's `PrecondGatedDeltaNet`; "Preconditioned DeltaNet:
    Curvature-aware Sequence Modeling for Linear Recurrences", arXiv 2604.21100).

    Gated DeltaNet whose write key is k̃_t = P_t ⊙ k_t, P_t a diagonal preconditioner squashed into
    [1/x, x] from the curvature estimate A_t = exp(g^A_t) A_{t-1} + β^A_t k_t ⊙ k_t:
        S_t = α_t S_{t-1} + β_t k̃_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ,      o_t = S_tᵀ q_t / sqrt(d_k),
    α_t = exp(−exp(A_log) · softplus(a_proj x_t + dt_bias)). Output: per-head RMSNorm (SiLU-gated by
    g_proj x with `use_gate`), out_proj. Init (fla's): A, A^A ~ U[0, 16], dt ~ log-U[0.001, 0.1] for both,
    centre `log_atk_scale_init`. Decode state: S [B, H, d_k, d_v], A [B, H, d_k] and the conv buffer.

    Options: num_heads (d_k = hidden / num_heads); expand_v: d_v = d_k · expand_v; use_short_conv /
    conv_size; use_gate; allow_neg_eigval: β ∈ (0, 2); squash_x: the preconditioner's range [1/x, x]
    (<= 2 for stability); squash_eps; log_atk_scale_init; norm_eps; chunk_size: chunk length of the
    reference; backend: `auto` (fla's `chunk_precond_gated_delta_rule` on CUDA), `reference` or `fused`.
    """

    fused_kernel = ("precond_gated_delta_rule", "chunk_precond_gated_delta_rule")

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
        allow_neg_eigval: bool = False,
        squash_x: float = 1.5,
        squash_eps: float = 1e-6,
        log_atk_scale_init: float = -0.2,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, squash_x=squash_x, squash_eps=squash_eps,
            log_atk_scale_init=log_atk_scale_init, atk_a_init=(0.0, 16.0), norm_eps=norm_eps,
            chunk_size=chunk_size, backend=backend, head_decay=(0.0, 16.0),
        )  # fmt: skip


@register_mixin("precond_kda")
class PrecondKDA(PrecondDeltaRuleMixin):
    """Preconditioned Kimi Delta Attention (fla's `PrecondKDA`; arXiv 2604.21100).

    KDA (a per-channel decay g_t = −exp(A_log) · softplus(f_proj x_t + dt_bias), f_proj low-rank
    d → d_v → d_k·H) with the preconditioned write key k̃_t = P_t ⊙ k_t of `precond_gated_deltanet`:
        S_t = D_t S_{t-1} + β_t k̃_t (v_t − (D_t S_{t-1})ᵀ k_t)ᵀ,      o_t = S_tᵀ q_t / sqrt(d_k).
    Output: per-head RMSNorm gated by sigmoid(g_proj x) (low-rank with a bias), out_proj. Init (fla's):
    A, A^A ~ U[1, 16], dt_bias = 0 (per channel), dt^A ~ log-U[0.001, 0.1]. Decode state: S [B, H, d_k,
    d_v], A [B, H, d_k] and the conv buffer.

    Options: as precond_gated_deltanet without `use_gate` (always gated); defaults expand_v 1.0;
    backend `auto` takes fla's `chunk_precond_kda` on CUDA.
    """

    fused_kernel = ("precond_kda", "chunk_precond_kda")
    gate_activation = "sigmoid"

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        squash_x: float = 1.5,
        squash_eps: float = 1e-6,
        log_atk_scale_init: float = -0.2,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=True,
            allow_neg_eigval=allow_neg_eigval, squash_x=squash_x, squash_eps=squash_eps,
            log_atk_scale_init=log_atk_scale_init, atk_a_init=(1.0, 16.0), norm_eps=norm_eps,
            chunk_size=chunk_size, backend=backend,
        )  # fmt: skip
        self.f_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.key_dim, bias=False),
        )
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(torch.zeros(self.key_dim))

    def log_decay(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x.dtype)
        batch, seq_len, _ = x.shape
        dt = F.softplus(self.f_proj(x).to(dtype) + self.dt_bias.to(dtype))  # [B, T, H·K]
        dt = dt.view(batch, seq_len, self.num_heads, self.head_k_dim)
        return -torch.exp(self.A_log.to(dtype))[:, None] * dt  # [B, T, H, K]

    def make_output_gate(self, hidden_size: int) -> nn.Module:
        return low_rank_gate(hidden_size, self.head_v_dim, self.value_dim)

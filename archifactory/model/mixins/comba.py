"""Comba: the delta-rule layer with a scalar-plus-low-rank state transition and output correction.

The layer shape is `deltanet.py`'s (fused q/k/v projection, short conv + SiLU, β = sigmoid(b_proj x), a
Mamba2-style per-head decay, gated per-head RMSNorm, out_proj); the recurrence is a diagonal-plus-low-rank
rule, so the reference is `reference/delta_rule.py`'s chunked DPLR form (`chunk_dplr`, `dplr_step`) with
a scalar decay. On CUDA fla's `chunk_comba`. Pads of a padded batch are identity steps as in `deltanet.py`
(zero conv input, β = 0, log-decay 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import MixinState, projection_flops
from archifactory.model.mixins.deltanet import DeltaRuleMixin
from archifactory.model.mixins.kit import fla_op, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import chunk_dplr, dplr_step, l2_normalize
from archifactory.model.positional import PositionContext


def comba_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    beta: Tensor,
    g: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """S_t = exp(g_t) S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ p_t)ᵀ, o_t = S_tᵀ q_t / sqrt(K): the DPLR rule
    S_t = D_t S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v'_tᵀ with a = p, b = −β k, v' = β v and a scalar decay.
    q/k/p [B, T, H, K], v [B, T, H, V], β and g [B, T, H]; one token (T = 1) with a state steps directly."""
    bv, bk, g = beta[..., None] * v, -beta[..., None] * k, g[..., None]  # g [B, T, H, 1]: scalar per head
    if initial_state is not None and q.shape[1] == 1:
        out, state = dplr_step(q[:, 0], k[:, 0], bv[:, 0], p[:, 0], bk[:, 0], g[:, 0], initial_state)
        return out[:, None], state
    return chunk_dplr(q, k, bv, p, bk, g, None, initial_state, output_final_state, chunk_size)


@register_mixin("comba")
class Comba(DeltaRuleMixin):
    """Comba (Hu et al., "Comba: Improving Bilinear RNNs with Closed-loop Control", 2025).

    Per head, with α_t = exp(g_t), g_t = −exp(A_log) · softplus(a_proj x_t + dt_bias) (Mamba2-style,
    A ~ U[0, 16]), β_t = sigmoid(b_proj x_t) and a "state feedback" key p_t = sigmoid(d) · k_t:
        S_t = (α_t I − β_t k_t p_tᵀ) S_{t-1} + β_t k_t v_tᵀ        (scalar-plus-low-rank transition)
        o_t = S_tᵀ q̃_t / sqrt(d_k),   q̃_t = q_t − D · p_t             ("output feedback" correction)
    Unlike Gated DeltaNet's α_t (I − β_t k_t k_tᵀ), the prediction S_{t-1}ᵀ p_t reads the undecayed state.
    q̃, k and p are L2-normalised per head (as fla's kernel does, so p's per-head scale sigmoid(d) only
    acts through the correction of q). q, k, v: short causal conv + SiLU; output: per-head RMSNorm gated
    by sigmoid(g_proj x), then out_proj. Init: d = 1 (`use_inner_decay`), D = `correction_factor`.
    Decode state: S [B, H, d_k, d_v] and the conv buffer.

    Options:
        num_heads (d_k = hidden / num_heads); expand_v: d_v = d_k · expand_v; use_short_conv / conv_size;
        use_gate: sigmoid output gate; use_output_correction / correction_factor: q̃ = q − D p (fla notes
        0.02 sometimes works better at small scale); use_inner_decay: p = sigmoid(d) k (else p = k);
        norm_eps; chunk_size: chunk length of the reference; backend: `auto` (fla's `chunk_comba` on
        CUDA), `reference` or `fused`.
    """

    fused_kernel = ("comba", "chunk_comba")
    gate_activation = "sigmoid"

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
        use_output_correction: bool = True,
        correction_factor: float = 1.0,
        use_inner_decay: bool = True,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate, allow_neg_eigval=False,
            norm_eps=norm_eps, chunk_size=chunk_size, backend=backend, head_decay=(0.0, 16.0),
        )  # fmt: skip
        self.decay = nn.Parameter(torch.ones(num_heads)) if use_inner_decay else None
        self.D = nn.Parameter(torch.full((num_heads,), correction_factor)) if use_output_correction else None

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
        p = k if self.decay is None else (k * torch.sigmoid(self.decay)[:, None]).to(k.dtype)
        if self.D is not None:
            q = (q - self.D[:, None] * p).to(k.dtype)
        q, k, p = l2_normalize(q), l2_normalize(k), l2_normalize(p)
        # pads are identity steps: β = 0 (no write, no correction) and log-decay 0 (α = 1)
        beta = zero_pads(torch.sigmoid(self.b_proj(x).to(compute_dtype(x.dtype))), ctx)  # [B, T, H]
        g = zero_pads(self.log_decay(x), ctx)
        past = None if state is None else state["recurrent"]
        if self.backend_name() == "fused" and not (past is not None and seq_len == 1):
            out, new_state = self._fused_comba(q, k, v, p, beta, g, past)
        else:
            out, new_state = comba_rule(q, k, v, p, beta, g, past, past is not None, self.chunk_size)
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.output_gate(x), self.gate_activation)
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def _fused_comba(
        self, q: Tensor, k: Tensor, v: Tensor, p: Tensor, beta: Tensor, g: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        kernel = fla_op(*self.fused_kernel)
        out, new_state = kernel(
            q=q, k=k, v=v, p=p, g=g.float().contiguous(), beta=beta.to(q.dtype),
            initial_state=None if past is None else past.float(), output_final_state=past is not None,
        )  # fmt: skip
        return out, None if past is None else new_state.to(past.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        # chunked DPLR per head and token: four C×C score blocks (p·k, p·k̃, q·k, q·k̃: 8CK), the solve
        # (C³/3 per chunk), its right-hand sides (2CK + 4CV), the three C×C-by-V products (6CV) and per
        # token the state read, the low-rank and rank-one state updates and the output read (8KV)
        chunk = min(self.chunk_size, max(seq_len, 1))
        k_dim, v_dim = self.head_k_dim, self.head_v_dim
        rule = self.num_heads * (
            10 * chunk * k_dim + 10 * chunk * v_dim + 2 * chunk * chunk / 3 + 8 * k_dim * v_dim
        )
        return projection_flops(self) + conv + rule

"""The momentum delta rule (Momentum DeltaNet) in plain PyTorch: a chunked training form and a decode step.

Per head, with two states S and M [K, V], log-decays log α_t, log μ_t <= 0 and a step size β_t:

    w_t = S_{t-1}ᵀ p_t − v_t              (the prediction error of the delta rule, read at p_t)
    M_t = μ_t M_{t-1} + k_t w_tᵀ           (momentum: a decayed sum of delta-rule gradients)
    S_t = α_t S_{t-1} − β_t M_t            o_t = scale · S_tᵀ q_t

(the layer folds its η_t into k_t and, by default, α_t into p_t). Layout as `delta_rule.py`: q/k/p
[B, T, H, K], v [B, T, H, V], scalars [B, T, H], states [B, H, K, V].

Chunked form. Inside a chunk entered with (S₀, M₀), with chunk-local cumulative log-decays a_t = Σ log α
and m_t = Σ log μ, unrolling M and then S gives
    S_t = e^{a_t} S₀ − b_t M₀ − Σ_{s<=t} Γ_ts k_s w_sᵀ,    M_t = e^{m_t} M₀ + Σ_{s<=t} e^{m_t − m_s} k_s w_sᵀ
with Γ_ts = Σ_{s<=r<=t} e^{a_t − a_r} β_r e^{m_r − m_s} and b_t = Σ_{r<=t} e^{a_t − a_r} β_r e^{m_r}: Γ is
the product of two lower-triangular pair-decay matrices (every exponent <= 0, so nothing overflows), and
the errors w of a chunk solve one unit lower-triangular system (the UT transform of the delta rule)
    (I + L) W = e^{a_{t-1}} P S₀ − b_{t-1} P M₀ − V,      L_ts = Γ_{t-1,s} p_t·k_s   (s < t).
fla's own chunked form (`chunk_momentum_delta_rule_ref`) reaches Γ through a log-cumsum-exp whose
exponents can be positive; this one keeps them <= 0. fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_chunks import unit_lower_inverse
from archifactory.model.mixins.reference.delta_rule import Chunker, pair_decay


def _previous(x: Tensor) -> Tensor:
    """x [..., C, W] shifted one row down the chunk (row t holds row t − 1; row 0 is zeros)."""
    return F.pad(x[..., :-1, :], (0, 0, 1, 0))


def chunk_momentum_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    log_alpha: Tensor,
    log_mu: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The chunked momentum delta rule (module docstring). `initial_state`: (S₀, M₀) or None (zeros).
    Returns o [B, T, H, V] in q's dtype and, if asked, the final (S, M) in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk = Chunker(q.shape[1], chunk_size, dtype)  # tail padding: α = μ = 1, β = 0, k = 0 keep (S, M)
    qc, kc, vc, pc = chunk(q) * scale, chunk(k), chunk(v), chunk(p)  # [B, H, N, C, *]
    la, lm, bc = chunk(log_alpha).cumsum(-2), chunk(log_mu).cumsum(-2), chunk(beta)  # [B, H, N, C, 1]
    decay_a = pair_decay(la, la, strict=False)[..., 0]  # e^{a_t − a_r}, r <= t: [B, H, N, C, C]
    decay_m = pair_decay(lm, lm, strict=False)[..., 0]  # e^{m_r − m_s}, s <= r
    gamma = decay_a @ (bc * decay_m)  # Γ_ts, lower triangular (diagonal included)
    b = decay_a @ (bc * lm.exp())  # [B, H, N, C, 1]
    solve = unit_lower_inverse(_previous(gamma) * (pc @ kc.transpose(-1, -2)))  # (I + L)⁻¹
    w_s = solve @ (_previous(la).exp() * pc)  # W = w_s S₀ − w_m M₀ − w_v
    w_m = solve @ (_previous(b) * pc)
    w_v = solve @ vc
    qk = gamma * (qc @ kc.transpose(-1, -2))  # [B, H, N, C, C]
    la_end, lm_end = la[..., -1:, :], lm[..., -1:, :]  # [B, H, N, 1, 1]
    k_s_end = kc * gamma[..., -1, :, None]  # Γ_{C,s} k_s: the chunk's write into S
    k_m_end = kc * (lm_end - lm).exp()  # e^{m_C − m_s} k_s: its write into M
    b_end = b[..., -1:, :]
    if initial_state is None:
        batch, _, heads, key_dim = q.shape
        s_state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
        m_state = s_state
    else:
        s_state, m_state = (x.to(dtype) for x in initial_state)
    entering_s, entering_m, errors = [], [], []
    # unbind, not [:, :, n]: indexing in a loop makes autograd build a full-size zero gradient per chunk
    for ws_n, wm_n, wv_n, ks_n, km_n, la_n, lm_n, b_n in zip(
        *(x.unbind(2) for x in (w_s, w_m, w_v, k_s_end, k_m_end, la_end, lm_end, b_end))
    ):
        entering_s.append(s_state)
        entering_m.append(m_state)
        w = ws_n @ s_state - wm_n @ m_state - wv_n  # [B, H, C, V]
        errors.append(w)
        s_state, m_state = (
            la_n.exp() * s_state - b_n * m_state - ks_n.transpose(-1, -2) @ w,
            lm_n.exp() * m_state + km_n.transpose(-1, -2) @ w,
        )
    out = (
        (qc * la.exp()) @ torch.stack(entering_s, dim=2)
        - (qc * b) @ torch.stack(entering_m, dim=2)
        - qk @ torch.stack(errors, dim=2)
    )  # [B, H, N, C, V]
    final = (s_state, m_state) if output_final_state else None
    return chunk.unchunk(out).to(q.dtype), final


def momentum_delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    log_alpha: Tensor,
    log_mu: Tensor,
    beta: Tensor,
    state: tuple[Tensor, Tensor],
    scale: float | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One decode step: q/k/p [B, H, K], v [B, H, V], scalars [B, H], state (S, M) [B, H, K, V]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_state, m_state = state
    dtype = s_state.dtype
    q, k, v, p, log_alpha, log_mu, beta = (x.to(dtype) for x in (q, k, v, p, log_alpha, log_mu, beta))
    error = (p[..., None, :] @ s_state).squeeze(-2) - v  # w_t [B, H, V]
    m_state = log_mu.exp()[..., None, None] * m_state + k[..., :, None] * error[..., None, :]
    s_state = log_alpha.exp()[..., None, None] * s_state - beta[..., None, None] * m_state
    out = scale * (q[..., None, :] @ s_state).squeeze(-2)
    return out, (s_state, m_state)

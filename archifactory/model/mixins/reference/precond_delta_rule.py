"""The preconditioned (gated) delta rule of Preconditioned DeltaNet in plain PyTorch: chunked and one step.

Per head, a diagonal curvature estimate A [K] (the "ATK" preconditioner state) runs beside the delta-rule
state S [K, V]:

    A_t = exp(g^A_t) A_{t-1} + β^A_t k_t ⊙ k_t                                (element-wise, per channel)
    P_t = exp(−log(x) · s(r_t)),  r_t = log(A_t + eps) − c,  s(r) = r / (1 + |r|)   (squashed into [1/x, x])
    S_t = D_t S_{t-1} + β_t (P_t ⊙ k_t)(v_t − k_tᵀ D_t S_{t-1})ᵀ,      o_t = scale · S_tᵀ q_t

with D_t = diag(exp g_t), g one scalar per head (Preconditioned Gated DeltaNet) or one per key channel
(Preconditioned KDA), and c a learnable per-head centre. The preconditioner only rescales the key the
delta rule *writes* with; it reads with k. A is `reference/hgrn.py`'s element-wise scan; given the
preconditioned keys, S is `delta_rule.py`'s chunked (gated) delta rule with the written key P ⊙ k and
the read key k (its `read_key`). Layout as `delta_rule.py`; A [B, H, K].
"""

from __future__ import annotations

import math

from torch import Tensor

from archifactory.model.mixins.reference.delta_rule import chunk_delta_rule, delta_rule_step
from archifactory.model.mixins.reference.hgrn import chunk_hgrn, hgrn_step


def squash_preconditioner(curvature: Tensor, center: Tensor, squash_x: float, eps: float) -> Tensor:
    """P = exp(−log(x) · s(log(A + eps) − c)) with s(r) = r / (1 + |r|): the curvature A [..., H, K]
    mapped smoothly into [1/x, x] around the per-head centre c [H] (large curvature: a smaller step)."""
    r = (curvature + eps).log() - center.to(curvature.dtype)[:, None]
    return (-math.log(squash_x) * r / (1 + r.abs())).exp()


def chunk_precond_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    g_atk: Tensor,
    beta_atk: Tensor,
    center: Tensor,
    squash_x: float,
    eps: float,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The chunked preconditioned delta rule (module docstring). q/k [B, T, H, K] (L2-normalised by the
    caller), v [B, T, H, V], g [B, T, H] or [B, T, H, K], β, g^A, β^A [B, T, H], centre c [H];
    `initial_state` (S₀ [B, H, K, V], A₀ [B, H, K]) or None. Returns o [B, T, H, V] in q's dtype and, if
    asked, the final (S, A) in the compute dtype."""
    batch, seq_len, heads, key_dim = k.shape
    written = beta_atk[..., None] * k.square()  # β^A k ⊙ k [B, T, H, K]
    decay = g_atk[..., None].expand_as(written)
    s_state, a_state = (None, None) if initial_state is None else initial_state
    curvature, a_final = chunk_hgrn(
        written.flatten(2),
        decay.flatten(2),
        None if a_state is None else a_state.flatten(1),
        output_final_state,
        chunk_size,
    )  # A_t for every t [B, T, H·K]
    precond = squash_preconditioner(curvature.view(batch, seq_len, heads, key_dim), center, squash_x, eps)
    out, s_final = chunk_delta_rule(
        q, k * precond, v, beta, g, None, s_state, output_final_state, chunk_size, read_key=k
    )
    if not output_final_state:
        return out, None
    return out, (s_final, a_final.view(batch, heads, key_dim))


def precond_delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    g_atk: Tensor,
    beta_atk: Tensor,
    center: Tensor,
    squash_x: float,
    eps: float,
    state: tuple[Tensor, Tensor],
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One decode step: q/k [B, H, K], v [B, H, V], g [B, H] or [B, H, K], β, g^A, β^A [B, H];
    state (S [B, H, K, V], A [B, H, K])."""
    s_state, a_state = state
    written = beta_atk[..., None].to(a_state.dtype) * k.to(a_state.dtype).square()
    _, a_state = hgrn_step(written, g_atk[..., None].expand_as(written), a_state)
    precond = squash_preconditioner(a_state, center, squash_x, eps)
    out, s_state = delta_rule_step(q, k * precond, v, beta, g, s_state, read_key=k)
    return out, (s_state, a_state)

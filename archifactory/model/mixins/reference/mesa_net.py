"""MesaNet's mesa layer in plain PyTorch: the chunked conjugate-gradient form and its decode step.

Per head, with decays γ_t = exp(g_t), write strengths β_t and a per-channel ridge λ > 0:

    H_t = γ_t H_{t-1} + β_t k_t k_tᵀ   [K, K]        G_t = γ_t G_{t-1} + β_t k_t v_tᵀ   [K, V]
    o_t = G_tᵀ x_t,   x_t ≈ (H_t + diag λ)⁻¹ q_t

x_t is found by `cg_steps` conjugate-gradient iterations from x = 0, exactly as fla's kernels (and its
`naive_mesa_net_CG`) do, with their 1e-5 guards in the step sizes; the iteration is differentiated through
by autograd. Chunked form: the states entering each chunk are carried chunk to chunk, and inside a chunk
of C tokens every product H_t p_t is Γ_t (H₀ p_t) + Σ_{s<=t} exp(B_t − B_s) β_s (p_t·k_s) k_s (B the
chunk-local cumulative log-decay), so all tokens iterate in parallel. Layout: q/k [B, T, H, K], v
[B, T, H, V], g/β [B, T, H], λ [H, K], states [B, H, K, K] and [B, H, K, V]. Runs in fp32 or fp64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker, pair_decay

CG_EPS = 1e-5  # fla's guard in both CG step sizes


def conjugate_gradient(apply: Callable[[Tensor], Tensor], q: Tensor, steps: int) -> Tensor:
    """x ≈ A⁻¹ q for the SPD operator `apply` acting on the last dim of q [..., K], from x = 0."""
    x = torch.zeros_like(q)
    r, p = q, q
    delta = (r * r).sum(-1, keepdim=True)
    for _ in range(steps):
        ap = apply(p)
        alpha = delta / ((p * ap).sum(-1, keepdim=True) + CG_EPS)
        x = x + alpha * p
        r = r - alpha * ap
        delta_new = (r * r).sum(-1, keepdim=True)
        p = r + delta_new / (delta + CG_EPS) * p
        delta = delta_new
    return x


def chunk_mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    cg_steps: int,
    initial_state: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The mesa layer over a sequence; see the module docstring. Returns o [B, T, H, V] in q's dtype and
    the final states (H [B, H, K, K], G [B, H, K, V]) in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    batch, _, heads, key_dim = q.shape
    chunk = Chunker(q.shape[1], chunk_size, dtype)
    qc, kc, vc, gc, bc = chunk(q), chunk(k), chunk(v), chunk(g), chunk(beta)  # [B, H, N, C, *]
    cum = gc.cumsum(-2)  # [B, H, N, C, 1]
    within = pair_decay(cum, cum, strict=False)[..., 0] * bc.transpose(-1, -2)  # exp(B_t − B_s) β_s
    last = cum[..., -1:, :]
    k_end = kc * bc * (last - cum).exp()  # β_s k_s decayed to the chunk end
    if initial_state is None:
        h_kk = q.new_zeros(batch, heads, key_dim, key_dim, dtype=dtype)
        h_kv = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
    else:
        h_kk, h_kv = (s.to(dtype) for s in initial_state)
    chunk_decay = last.exp()  # [B, H, N, 1, 1]
    kk_in, h_kk = carry_chunks(h_kk, k_end.transpose(-1, -2) @ kc, chunk_decay)  # [B, H, N, K, K]
    kv_in, h_kv = carry_chunks(h_kv, k_end.transpose(-1, -2) @ vc, chunk_decay)
    start = cum.exp()  # Γ_t: decay from the chunk start through t
    ridge = lamb.to(dtype)[None, :, None, None, :]  # [1, H, 1, 1, K]

    def apply(p: Tensor) -> Tensor:  # (H_t + diag λ) p_t for every token t at once
        return start * (p @ kk_in) + ((p @ kc.transpose(-1, -2)) * within) @ kc + ridge * p

    x = conjugate_gradient(apply, qc, cg_steps)
    out = start * (x @ kv_in) + ((x @ kc.transpose(-1, -2)) * within) @ vc
    return chunk.unchunk(out).to(q.dtype), (h_kk, h_kv)


def mesa_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    cg_steps: int,
    state: tuple[Tensor, Tensor],
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One decode step: q/k [B, H, K], v [B, H, V], g/β [B, H], λ [H, K], state (H, G)."""
    h_kk, h_kv = state
    dtype = h_kk.dtype
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    decay = g.exp()[..., None, None]
    k_beta = (beta[..., None] * k)[..., :, None]  # [B, H, K, 1]
    h_kk = decay * h_kk + k_beta * k[..., None, :]
    h_kv = decay * h_kv + k_beta * v[..., None, :]
    ridge = lamb.to(dtype)

    def apply(p: Tensor) -> Tensor:
        return (p[..., None, :] @ h_kk).squeeze(-2) + ridge * p

    x = conjugate_gradient(apply, q, cg_steps)
    return (x[..., None, :] @ h_kv).squeeze(-2), (h_kk, h_kv)

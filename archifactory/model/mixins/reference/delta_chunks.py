"""The chunked delta rule after its score matrices, as one autograd Function: the WY solve, the state loop
and the output of `delta_rule.chunk_delta_rule`.

Per chunk (batch dims [B, H, N]) with the scaled q, the written key k, the read key r, v, β [C, 1], the
chunk-local cumulative log-decay B [C, W] (W = K per channel, 1 per head or without decay), the decayed
strictly lower scores kk = (r·k)[t, s] e^{B_t − B_s} and the lower qk = (q·k)[t, s] e^{B_t − B_s}:

    T = (I + β ⊙ kk)⁻¹,   W_v = T (β ⊙ v),   W_k = T (β ⊙ r ⊙ e^B),
    U_n = W_v − W_k S_n,   S_{n+1} = e^{B_C} ⊙ S_n + (k ⊙ e^{B_C − B})ᵀ U_n,      (read_carry's loop)
    o_n = (q ⊙ e^B) S_n + qk U_n.

Autograd over these records about ten [C, K]-sized tensors per chunk for the backward (the operands of
W_v and W_k, e^B, the decayed q and k, ...). `DeltaChunks` saves only its inputs, T and the loop's
entering states and rows U, recomputes the elementwise factors and W_k, and runs the chain rule by hand:

    dq_s = do Sᵀ,  dS_n += q_sᵀ do,  dqk = do Uᵀ,  dU += qkᵀ do,   then read_carry's reverse loop,
    dT = dW_v (β v)ᵀ + dW_k (β r e^B)ᵀ,   dA = strictly lower part of −Tᵀ dT Tᵀ  (A = β ⊙ kk),
    dkk = β ⊙ dA,   dβ = Σ_s dA ⊙ kk + Σ_V (Tᵀ dW_v) ⊙ v + Σ_K (Tᵀ dW_k) ⊙ r e^B,
    dB collects (Tᵀ dW_k) ⊙ W_k's operand, dq_s ⊙ q_s, −dk_end ⊙ k_end and, at the chunk's last row,
    the chunk-end decay's terms.

tests/model/test_delta_chunks.py holds values and every gradient to the same steps under autograd.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from archifactory.model.mixins.reference.read_carry import carry_backward, carry_forward


def delta_rule_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    cum: Tensor,
    kk: Tensor,
    qk: Tensor,
    state: Tensor,
    read_key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q/k [B, H, N, C, K], v [B, H, N, C, V], β [B, H, N, C, 1], cum [B, H, N, C, K or 1], kk (strictly
    lower) and qk (lower) [B, H, N, C, C], state S₀ [B, H, K, V], the read key r [B, H, N, C, K] or None
    (r = k) -> (o [B, H, N, C, V], the final state)."""
    return DeltaChunks.apply(q, k, v, beta, cum, kk, qk, state, read_key)


def unit_lower_inverse(a: Tensor) -> Tensor:
    """(I + a)⁻¹ for strictly lower-triangular a [..., C, C], by a triangular solve."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve_triangular(a + eye, eye.expand_as(a), upper=False, unitriangular=True)


class _Factors:
    """What both passes recompute from the inputs: e^B, the decays to the chunk end, W_k's operand."""

    def __init__(self, k: Tensor, r: Tensor, beta: Tensor, cum: Tensor) -> None:
        self.width = cum.shape[-1]
        self.start = cum.exp()  # e^{B_t}: decayed from the chunk start through t
        last = cum[..., -1:, :]
        self.tail = (last - cum).exp_()  # e^{B_C − B_t}: decayed from after t to the chunk end
        self.chunk_decay = last.transpose(-1, -2).exp()  # [.., W, 1]: scales the rows of S
        self.k_end = k * self.tail
        self.key_operand = beta * r * self.start  # W_k = T (β ⊙ r ⊙ e^B)

    def to_width(self, t: Tensor) -> Tensor:
        """A [.., C, K] gradient of e^B-scaled terms reduced to the decay's width."""
        return t if self.width == t.shape[-1] else t.sum(-1, keepdim=True)


class DeltaChunks(torch.autograd.Function):
    """`delta_rule_chunks` with the hand-written backward of the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        beta: Tensor,
        cum: Tensor,
        kk: Tensor,
        qk: Tensor,
        state: Tensor,
        read_key: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        factors = _Factors(k, k if read_key is None else read_key, beta, cum)
        solve = unit_lower_inverse(beta * kk)
        value_rows = solve @ (beta * v)  # W_v
        read = torch.matmul(solve, factors.key_operand).neg_()  # −W_k
        entering, updates, state = carry_forward(
            value_rows, read, factors.k_end, factors.chunk_decay, state, None
        )
        out = torch.matmul(q * factors.start, entering).add_(qk @ updates)
        ctx.save_for_backward(q, k, v, beta, cum, kk, qk, solve, entering, updates, read_key)
        return out, state

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_state: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, beta, cum, kk, qk, solve, entering, updates, read_key = ctx.saved_tensors
        r = k if read_key is None else read_key
        factors = _Factors(k, r, beta, cum)
        q_start = q * factors.start
        read = torch.matmul(solve, factors.key_operand).neg_()
        d_q_start = d_out @ entering.transpose(-1, -2)
        d_entering = q_start.transpose(-1, -2) @ d_out
        d_qk = d_out @ updates.transpose(-1, -2)
        d_updates = qk.transpose(-1, -2) @ d_out
        d_value_rows, d_read, d_k_end, d_chunk_decay, d_state, _ = carry_backward(
            read, factors.k_end, factors.chunk_decay, entering, updates, d_entering, d_updates, d_state, False
        )
        value_operand = beta * v
        solve_t = solve.transpose(-1, -2)
        d_solve = d_value_rows @ value_operand.transpose(-1, -2)
        d_solve -= d_read @ factors.key_operand.transpose(-1, -2)
        d_value_operand = solve_t @ d_value_rows
        d_key_operand = -(solve_t @ d_read)
        d_a = -(solve_t @ d_solve @ solve_t).tril_(-1)  # A = β ⊙ kk is strictly lower
        d_kk = beta * d_a
        d_beta = (d_a * kk).sum(-1, keepdim=True) + (d_value_operand * v).sum(-1, keepdim=True)
        d_beta += (d_key_operand * r * factors.start).sum(-1, keepdim=True)
        d_v = beta * d_value_operand
        d_r = d_key_operand * beta * factors.start
        d_q = d_q_start * factors.start
        d_k = d_k_end * factors.tail
        to_end = factors.to_width(d_k_end * factors.k_end)  # the gradient of B_C − B_t
        d_cum = factors.to_width(d_key_operand * factors.key_operand + d_q_start * q_start) - to_end
        d_last = to_end.sum(-2, keepdim=True) + (d_chunk_decay * factors.chunk_decay).transpose(-1, -2)
        d_cum[..., -1:, :] += d_last
        if read_key is None:  # r is k
            return d_q, d_k + d_r, d_v, d_beta, d_cum, d_kk, d_qk, d_state, None
        return d_q, d_k, d_v, d_beta, d_cum, d_kk, d_qk, d_state, d_r

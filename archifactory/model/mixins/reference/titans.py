"""Titans' neural memory, the linear variant of fla's `fla.ops.titans` (Behrouz et al., "Titans: Learning to
Memorize at Test Time", 2024), in plain PyTorch: a chunked training form over mini-batches.

Per head (d = head size) the memory is a linear map M [d, d] with the inner model f(x) = x + LN(x M) (LN:
a LayerNorm over d with the learned gain/shift `ln_weight`, `ln_bias`) and the associative loss
ℓ_t(M) = ‖LN(k_t M) − (v_t − k_t)‖². With per-token gates — the inner learning rate θ_t >= 0, the
momentum (past surprise) decay η_t ∈ (0, 1] and the forgetting α_t ∈ [0, 1) —

    S_t = η_t S_{t-1} − θ_t ∇ℓ_t(M₀),      M_t = (1 − α_t) M_{t-1} + c_t S_t,      z_t = q_t M_t
    o_t = z_t + LN(z_t)

(c_t = 1 at a real token, 0 at an empty slot: with θ = 0, η = 1, α = 0 that is the identity step — the
momentum alone would still flow into M), where the gradient is taken at M₀, the memory the token's
mini-batch of `chunk_size` tokens entered with (the paper's parallel mini-batch training; the size is
part of the math): ∇ℓ_t = 2 k_tᵀ ∂ℓ/∂z at z = k_t M₀ (`ttt.inner_gradient`). The momentum S and the
memory M run on token by token.

Chunked form. With chunk-local log-cumsums a_t = Σ log(1 − α), m_t = Σ log η and u_s = θ_s ∇_s,
    S_t = e^{m_t} S₀ − Σ_{s<=t} e^{m_t − m_s} k_sᵀ u_s
    M_t = e^{a_t} M₀' + f_t S₀ − Σ_{s<=t} Γ_ts k_sᵀ u_s,   Γ_ts = Σ_{s<=r<=t} e^{a_t − a_r} c_r e^{m_r − m_s},
    f_t = Σ_{r<=t} e^{a_t − a_r} c_r e^{m_r}
(M₀' the memory entering the chunk): Γ is a product of two lower-triangular pair-decay matrices with
exponents <= 0 (fla's naive reaches it by log-sum-exp loops). A mini-batch refreshes the gradient anchor
M₀ ← M at its last slot when that slot is real; empty slots (zeros from `mini_batch.MiniBatchLayout`:
θ = 0, log η = log(1 − α) = 0) change nothing. The decode state is (M, M₀, S): a call may stop mid-mini-
batch and the next continues it exactly.

Layout: q/k/v [B, T, H, d], gates [B, T, H], `real` [B, T] bool (None: every token; one run of True per
row, starting in the first mini-batch), state tensors [B, H, d, d] (or [H, d, d], shared by the rows).
Computes in at least fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import pair_decay
from archifactory.model.mixins.reference.ttt import inner_gradient, layer_norm_rows


class TitansState(NamedTuple):
    """The memory M, the gradient anchor M₀ (the memory the current mini-batch entered with) and the
    momentum S, each [B, H, d, d]."""

    memory: Tensor
    anchor: Tensor
    momentum: Tensor


def _chunks(x: Tensor, chunk: int) -> Tensor:
    """[B, T, H, W] (T a multiple of `chunk`) -> [B, H, N, C, W]."""
    batch, length, heads, width = x.shape
    return x.reshape(batch, length // chunk, chunk, heads, width).permute(0, 3, 1, 2, 4)


def titans_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor,
    log_keep: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: TitansState,
    real: Tensor | None = None,
    chunk_size: int = 16,
    eps: float = 1e-6,
) -> tuple[Tensor, TitansState]:
    """The chunked Titans memory (module docstring) from `state`; `theta`, `log_eta` (log η) and
    `log_keep` (log(1 − α)) [B, T, H]. Returns o [B, T, H, d] in q's dtype and the state after the last
    token in the compute dtype."""
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    batch, seq_len, heads, dim = q.shape
    pad = (-seq_len) % chunk_size  # tail slots: zeros, the identity step
    if real is None:
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=q.device)
    real = F.pad(real, (0, pad), value=False)[:, :, None, None].expand(-1, -1, heads, 1)  # [B, T', H, 1]
    q, k, v = (F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    theta, log_eta, log_keep = (
        F.pad(x.to(dtype), (0, 0, 0, pad))[..., None] for x in (theta, log_eta, log_keep)
    )
    w, b = ln_weight.to(dtype)[:, None, None], ln_bias.to(dtype)[:, None, None]  # [H, 1, 1, d]
    q, k, v, theta, log_eta, log_keep, real = (
        _chunks(x, chunk_size) for x in (q, k, v, theta, log_eta, log_keep, real)
    )
    # everything but the gradients is independent of the memory: computed for all chunks at once
    a, m = log_keep.cumsum(-2), log_eta.cumsum(-2)  # [B, H, N, C, 1]
    # e^{a_t − a_r} c_r, r <= t: [B, H, N, C, C]; c_r = 0 at an empty slot, whose S must not enter M
    decay_a = pair_decay(a, a, strict=False)[..., 0] * real.mT
    gamma = decay_a @ pair_decay(m, m, strict=False)[..., 0]  # Γ_ts
    f = decay_a @ m.exp()  # [B, H, N, C, 1]
    write_m = gamma[..., -1, :, None] * k  # Γ_Cs k_s: the chunk's write into M
    write_s = (m[..., -1:, :] - m).exp() * k  # e^{m_C − m_s} k_s: its write into S
    keep_m, keep_s, from_s = a[..., -1:, :].exp(), m[..., -1:, :].exp(), f[..., -1:, :]  # [B, H, N, 1, 1]
    memory, anchor, momentum = (x.to(dtype).expand(batch, heads, dim, dim) for x in state)
    entering_m, entering_s, updates = [], [], []
    # unbind, not [:, :, n]: indexing in a loop makes autograd build a full-size zero gradient per chunk
    for k_n, v_n, th_n, wm_n, ws_n, km_n, ks_n, fs_n, done in zip(
        *(x.unbind(2) for x in (k, v, theta, write_m, write_s, keep_m, keep_s, from_s, real[..., -1:, :]))
    ):
        entering_m.append(memory)
        entering_s.append(momentum)
        u = 2 * th_n * inner_gradient(k_n, v_n, k_n @ anchor, w[:, 0], b[:, 0], eps)  # θ_s ∂ℓ_s/∂z
        updates.append(u)
        memory, momentum = km_n * memory + fs_n * momentum - wm_n.mT @ u, ks_n * momentum - ws_n.mT @ u
        anchor = torch.where(done, memory, anchor)  # a finished mini-batch moves the anchor
    z = (
        (q * a.exp()) @ torch.stack(entering_m, dim=2)
        + (q * f) @ torch.stack(entering_s, dim=2)
        - (gamma * (q @ k.mT)) @ torch.stack(updates, dim=2)
    )  # [B, H, N, C, d]
    z = z.reshape(batch, heads, -1, dim)[:, :, :seq_len].transpose(1, 2)
    z_hat, _ = layer_norm_rows(z, eps)
    out = z + z_hat * ln_weight.to(dtype) + ln_bias.to(dtype)  # [B, T, H, d]
    return out.to(in_dtype), TitansState(memory, anchor, momentum)

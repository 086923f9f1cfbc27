"""Mamba-3's SISO recurrence in plain PyTorch (Lahoti et al., "Mamba-3: Improved Sequence Modeling using
State Space Principles", 2026; the step semantics of mamba_ssm's `mamba3_siso` kernels).

Per head, with state h [N, P], decay α_t = exp(A_t·Δ_t), trapezoid weight λ_t ∈ (0, 1), rotated key and
query k_t, q_t [N] and value x_t [P]:

    h_t = α_t h_{t−1} + (1 − λ_t) Δ_t α_t k_{t−1} x_{t−1}ᵀ + λ_t Δ_t k_t x_tᵀ,      y_t = h_tᵀ q_t

(the trapezoidal rule: the input integrated over [t−1, t] from both ends). Folding the next step's left
end into this one, h'_t = h_t + σ_t k_t x_tᵀ with σ_t = (1 − λ_{t+1}) Δ_{t+1}, turns it into simple gated
linear attention, h'_t = α_t h'_{t−1} + (λ_t Δ_t + σ_t) k_t x_tᵀ, read as y_t = h'_tᵀ q_t − σ_t (q_t·k_t) x_t;
σ of a call's last token is 0, so the final state is h_T itself, and the next call folds the carried
k_{T}, x_{T} in with its own first (1 − λ)Δ. Chunked through the simple-GLA reference (or fla's
`chunk_simple_gla`). The rotation — Mamba-3's complex state as data-dependent RoPE — turns pairs
(2i, 2i+1) of the first 2A channels of k and q by the running angle φ_t = φ_{t−1} + Δ_t·π·tanh(θ_t)
(mod 2π) per head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from archifactory.model.mixins.reference.simple_gla import simple_gla_forward


def running_angles(theta: Tensor, dt: Tensor, start: Tensor | None) -> Tensor:
    """φ_t [B, T, H, A] = (start + Σ_{s<=t} Δ_s · π · tanh θ_s) mod 2π, with θ [B, T, A] shared by the
    heads, Δ [B, T, H], start [B, H, A] (None = 0)."""
    steps = (torch.tanh(theta) * math.pi)[:, :, None, :] * dt[..., None]
    angles = steps.cumsum(1) if start is None else steps.cumsum(1) + start[:, None]
    return torch.remainder(angles, 2 * math.pi)


def rotate_pairs(x: Tensor, angles: Tensor) -> Tensor:
    """x [..., N] with each pair (2i, 2i+1), i < A, turned by angles [..., A]; the other channels as is."""
    pairs = 2 * angles.shape[-1]
    head, tail = x[..., :pairs].unflatten(-1, (-1, 2)), x[..., pairs:]
    cos, sin = angles.cos(), angles.sin()
    even, odd = head[..., 0], head[..., 1]
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([turned, tail], dim=-1)


def trapezoid_scan(
    q: Tensor,
    k: Tensor,
    x: Tensor,
    log_decay: Tensor,
    dt: Tensor,
    trap: Tensor,
    first: Tensor | None,
    past: tuple[Tensor, Tensor, Tensor] | None,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """y [B, T, H, P] of the recurrence above (without Mamba-3's D skip and gate) for rotated q, k
    [B, T, H, N], values x [B, T, H, P], A·Δ, Δ and λ [B, T, H]; `first` [B, T] marks each row's first
    real token (None: position 0), where a carried k, x is folded in; `past` = (h [B, H, N, P], the last
    rotated key [B, H, N], the last value [B, H, P]) or None (no state: none is returned)."""
    left = (1 - trap) * dt  # (1 − λ_t) Δ_t
    sigma = torch.cat([left[:, 1:], torch.zeros_like(left[:, :1])], dim=1)  # σ_t, 0 for the last token
    keys = k * (trap * dt + sigma)[..., None]
    state = None
    if past is not None:
        h, k_prev, x_prev = past
        fold = left[:, 0] if first is None else (left * first[..., None]).sum(1)  # [B, H]
        state = h + fold[..., None, None] * k_prev[..., :, None] * x_prev[..., None, :]
    y, h = simple_gla_forward(q, keys, x, log_decay, 1.0, state, backend, chunk_size)
    y = y - (sigma * (q * k).sum(-1))[..., None] * x
    return y, None if past is None else (h, k[:, -1], x[:, -1])

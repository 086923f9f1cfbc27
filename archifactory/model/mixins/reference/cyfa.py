"""Cyclic Flow Attention (CyFA) in plain PyTorch: two simple-GLA passes through M Fourier slots per head.

Per head, a learned clock λ_t = λ_0 + Σ_{j<=t} δ_j (δ ∈ (0, 1)) places each token on a circle of period
P = M − 1. The slots are the real Fourier modes of that circle, M/2 (cos, sin) pairs with frequencies
ω_p = 2πp/P; token j is written at its clock as the atom a(λ_j) = c_p (cos ω_pλ_j, −sin ω_pλ_j) per pair
(c_0 = P^−½, c_p = (2/P)^½, the sine of the constant pair is 0), weighted by β_j, into aligned key and
value memories with one scalar decay exp(g_t) per head:

    H^k_t = exp(g_t) H^k_{t−1} + k_t (β_t a(λ_t))ᵀ    [K, M]
    H^v_t = exp(g_t) H^v_{t−1} + β_t a(λ_t) v_tᵀ      [M, V]

Reading at t: the slot logits u_t = scale · q_tᵀ H^k_t are rotated forward by the clock, R(λ_t) u_t
(each pair turned by the angle ω_pλ_t), which makes them functions of the relative time λ_t − λ_j only;
the readout table W = readout_h · F (readout_h [P, P] learned, identity at init; F [P, M] the Fourier
basis sampled at the P integer lags) turns them into P lag logits, a softmax picks lags, and the
probabilities go back through Wᵀ and the inverse rotation to slot weights w_t = R(λ_t)ᵀ Wᵀ softmax(W R(λ_t)
u_t), which read o_t = H^vᵀ_t w_t. At init, lag r's logit is Σ_j decay·β_j (q_t·k_j) D(λ_t − λ_j − r) with
D the periodic (Dirichlet) kernel peaked at 0: a softmax over relative-time bins of the memory.

Both memories are simple GLA (scalar decay per head): H^k with keys k and "values" β a(λ), H^v with keys
β a(λ) and values v; between them is a per-token map. So the reference is `chunk_simple_gla` twice, and
a decode step is `simple_gla_step` twice. Phases are reduced as fla does, in slot units before turning into
radians: (⌊λ⌋ mod P · p mod P) + frac(λ)·p, wrapped to (−P/2, P/2], so long clocks keep their precision.
Layout as fla's `chunk_cyfa`: q/k [B, T, H, K], v [B, T, H, V], g/δ/β [B, T, H]; readout [H, P, P];
state (H^k [B, H, K, M], H^v [B, H, M, V], λ [B, H]). Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import simple_gla_forward

FUSED_KERNEL = ("cyfa", "chunk_cyfa")  # fla.ops.cyfa.chunk_cyfa

CyfaState = tuple[Tensor, Tensor, Tensor]  # H^k [B, H, K, M], H^v [B, H, M, V], clock λ [B, H]


def pair_phases(clock: Tensor, slots: int) -> Tensor:
    """ω_p λ (mod 2π) for each of the M/2 slot pairs: clock [...] -> [..., M/2], reduced in slot units
    (module docstring); the floor carries no gradient, the fraction all of it."""
    period = slots - 1
    pair = torch.arange(slots // 2, device=clock.device, dtype=clock.dtype)
    whole = torch.floor(clock)
    turns = torch.remainder(torch.remainder(whole, period)[..., None] * pair, period)  # exact integers
    coordinate = turns + (clock - whole)[..., None] * pair
    coordinate = torch.where(coordinate > period / 2, coordinate - period, coordinate)
    return coordinate * (2 * math.pi / period)


def write_atoms(phase: Tensor) -> Tensor:
    """a(λ) [..., M] from the pair phases [..., M/2]: c_p (cos, −sin) per pair, interleaved."""
    period = 2 * phase.shape[-1] - 1
    weight = phase.new_full((phase.shape[-1], 1), (2 / period) ** 0.5)  # [M/2, 1]
    weight[0] = period**-0.5
    return (torch.stack([phase.cos(), -phase.sin()], -1) * weight).flatten(-2)


def rotate(x: Tensor, phase: Tensor, sign: float) -> Tensor:
    """Each (cos, sin) pair of x [..., M] turned by sign · its phase [..., M/2] (sign −1: the inverse)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., M/2, 2]
    cos, sin = phase.cos(), sign * phase.sin()
    xc, xs = pairs[..., 0], pairs[..., 1]
    return torch.stack([cos * xc - sin * xs, sin * xc + cos * xs], -1).flatten(-2)


def fourier_basis(slots: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """F [P, M]: the slot modes sampled at the integer lags r = 0..P−1 (cos rω_p, sin rω_p), orthonormal
    weights, the constant pair's sine column 0."""
    period = slots - 1
    lags = torch.arange(period, device=device, dtype=dtype)[:, None]
    omega = torch.arange(slots // 2, device=device, dtype=dtype) * (2 * math.pi / period)
    basis = torch.stack([(lags * omega).cos(), (lags * omega).sin()], -1).flatten(-2) * (2 / period) ** 0.5
    basis[:, 0] = period**-0.5
    basis[:, 1] = 0.0
    return basis


def lag_readout(logits: Tensor, phase: Tensor, table: Tensor) -> Tensor:
    """Slot weights w_t [B, T, H, M] from the slot logits u_t [B, T, H, M]: rotate forward, lag logits
    through the table [H, P, M], softmax over the P lags, back through the table, rotate back."""
    lag_logits = torch.einsum("hrm,bthm->bthr", table, rotate(logits, phase, 1.0))
    probs = lag_logits.softmax(-1)
    return rotate(torch.einsum("hrm,bthr->bthm", table, probs), phase, -1.0)


def empty_state(q: Tensor, v: Tensor, slots: int) -> CyfaState:
    """Zero memories and a zero clock for q [B, T, H, K], v [B, T, H, V]."""
    batch, _, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    return (
        q.new_zeros(batch, heads, key_dim, slots, dtype=dtype),
        q.new_zeros(batch, heads, slots, v.shape[-1], dtype=dtype),
        q.new_zeros(batch, heads, dtype=dtype),
    )


def cyfa_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    delta: Tensor,
    beta: Tensor,
    readout: Tensor,
    scale: float,
    state: CyfaState | None,
    chunk_size: int,
) -> tuple[Tensor, CyfaState | None]:
    """The recurrence of the module docstring (q, k already RMS-normalised): o [B, T, H, V] in the compute
    dtype, and the final state when `state` is given (None: an empty start, no state returned)."""
    dtype = compute_dtype(q.dtype)
    slots = readout.shape[-1] + 1
    clock0 = None if state is None else state[2].to(dtype)
    clock = delta.to(dtype).cumsum(1)  # [B, T, H]
    clock = clock if clock0 is None else clock + clock0[:, None]
    phase = pair_phases(clock, slots)  # [B, T, H, M/2]
    write = beta.to(dtype)[..., None] * write_atoms(phase)  # [B, T, H, M]
    g = g.to(dtype)
    hk, hv = (None, None) if state is None else state[:2]
    logits, hk = simple_gla_forward(q.to(dtype), k.to(dtype), write, g, scale, hk, "reference", chunk_size)
    table = readout.to(dtype) @ fourier_basis(slots, q.device, dtype)  # [H, P, M]
    weights = lag_readout(logits, phase, table)
    out, hv = simple_gla_forward(weights, write, v.to(dtype), g, 1.0, hv, "reference", chunk_size)
    return out, None if state is None else (hk, hv, clock[:, -1])


def cyfa_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    delta: Tensor,
    beta: Tensor,
    readout: Tensor,
    norms: tuple[Tensor, Tensor, float],
    scale: float,
) -> Tensor:
    """fla's `chunk_cyfa` from an empty state on raw q, k (it RMS-normalises them itself with the gains and
    eps in `norms`); the training path."""
    q_weight, k_weight, eps = norms
    out, _ = fla_op(*FUSED_KERNEL)(
        q=q, k=k, v=v.to(q.dtype), g=g.float(), delta=delta.float(), beta=beta.float(),
        q_norm_weight=q_weight, k_norm_weight=k_weight, q_norm_eps=eps, k_norm_eps=eps,
        readout=readout, scale=scale,
    )  # fmt: skip
    return out

"""The delta-rule family in plain PyTorch: chunked (WY / UT-transform) training forms and decode steps.

Per head, with state S [K, V], log-decay g_t <= 0 (None: no decay; one scalar per head: Gated DeltaNet;
one per key channel: Kimi Delta Attention) and D_t = diag(exp g_t):

    delta rule:   S_t = (I - β_t k_t k_tᵀ) D_t S_{t-1} + β_t k_t v_tᵀ        o_t = scale · S_tᵀ q_t
    DPLR (RWKV-7): S_t = D_t S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ          o_t = scale · S_tᵀ q_t

Layout follows fla: q/k/a/b [B, T, H, K], v [B, T, H, V], β [B, T, H], g [B, T, H] or [B, T, H, K],
state [B, H, K, V].

Chunked form. Inside a chunk of C tokens entered with state S₀, let B_t = Σ_{j<=t} g_j (chunk-local) and
write every state as S_t = Γ_t S₀ + Σ_{s<=t} (Γ_t / Γ_s) k_s x_sᵀ for some per-token rows x_s. For the
delta rule x_s = u_s = β_s (v_s − (D_s S_{s-1})ᵀ k_s), which unrolls to a unit lower-triangular system

    (I + A) U = diag(β) (V − K̃ S₀),   A_ts = β_t Σ_c k_t[c] k_s[c] exp(B_t[c] − B_s[c])  (s < t),
    K̃_t = exp(B_t) ⊙ k_t,

solved once per chunk (the UT transform: U = W_v − W_k S₀ with W = (I + A)⁻¹ diag(β) [V, K̃]), so the
loop over chunks is two matrix products. RWKV-7's DPLR rule does the same with h_t = S_{t-1}ᵀ a_t in place
of u_t (`chunk_dplr`). Only differences B_t − B_s with s <= t (or B_t itself) are exponentiated, after
masking, so every exponent is <= 0: nothing overflows however long the sequence or strong the decay.
Per-channel decays go through `per_channel.per_channel_scores` (sub-chunked, with a hand-written
backward; their default chunk is smaller); scalar decays through a [C, C] pairwise decay. After the
scores, the delta rule's solve, loop over chunks and output are one Function with a hand-written backward
(`delta_chunks.delta_rule_chunks`); DPLR's loop is `read_carry.carry_with_readout`. Everything runs in fp32
(fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_chunks import delta_rule_chunks, unit_lower_inverse
from archifactory.model.mixins.reference.per_channel import per_channel_scores, sub_chunk_length
from archifactory.model.mixins.reference.read_carry import carry_with_readout


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(Σx² + eps) over the last dim (fla's `l2norm`, which its kernels apply to q and k)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class Chunker:
    """Pads [B, T, H, ...] tensors to whole chunks and lays them out as [B, H, N, C, ...]."""

    def __init__(self, seq_len: int, chunk_size: int, dtype: torch.dtype, multiple: int = 1) -> None:
        """`multiple`: the chunk length is rounded up to a multiple of it (the sub-chunk length)."""
        self.seq_len = seq_len
        self.size = -(-max(1, min(chunk_size, seq_len)) // multiple) * multiple
        self.pad = (-seq_len) % self.size
        self.chunks = (seq_len + self.pad) // self.size
        self.dtype = dtype

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        if x.dim() == 3:  # [B, T, H] -> [B, T, H, 1]
            x = x[..., None]
        if self.pad:  # zero padding: k = v = β = 0 and g = 0 leave the final state exact
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        batch, _, heads, width = x.shape
        return x.transpose(1, 2).reshape(batch, heads, self.chunks, self.size, width)

    def unchunk(self, o: Tensor) -> Tensor:
        """[B, H, N, C, V] -> [B, T, H, V] (padding dropped)."""
        batch, heads = o.shape[:2]
        return o.reshape(batch, heads, self.chunks * self.size, -1)[:, :, : self.seq_len].transpose(1, 2)


def pair_decay(rows: Tensor, cols: Tensor, strict: bool) -> Tensor:
    """exp(rows_t − cols_s) for s <= t (s < t if strict), 0 elsewhere. rows/cols [..., C, W] with W = 1
    (scalar decay) or K (per channel) -> [..., C, C, W]. The mask is applied before exp."""
    size = rows.shape[-2]
    keep = torch.ones(size, size, dtype=torch.bool, device=rows.device).tril(-1 if strict else 0)
    diff = rows[..., :, None, :] - cols[..., None, :, :]
    return diff.masked_fill(~keep[..., None], float("-inf")).exp()


def decayed_scores(x: Tensor, y: Tensor, decay: Tensor) -> Tensor:
    """Σ_c x_t[c] y_s[c] decay[t, s, c]: x/y [..., C, K], decay [..., C, C, 1 or K] -> [..., C, C]."""
    if decay.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * decay[..., 0]
    return torch.einsum("...tc,...sc,...tsc->...ts", x, y, decay)


def initial_state_or_zeros(q: Tensor, value_dim: int, state: Tensor | None, dtype: torch.dtype) -> Tensor:
    batch, _, heads, key_dim = q.shape
    if state is None:
        return q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)
    return state.to(dtype)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    sub_chunk_size: int | None = None,
    read_key: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (gated) delta rule; see the module docstring. g: None, [B, T, H] or [B, T, H, K].
    A per-channel g goes through `per_channel.per_channel_scores` (sub-chunks of `sub_chunk_size`, default
    about sqrt(chunk_size)); a scalar or no decay through the [C, C] pairwise decay.
    `read_key` [B, T, H, K]: the key r_t the state is read with when it differs from the written key k_t,
    S_t = D_t S_{t-1} + β_t k_t (v_t − (D_t S_{t-1})ᵀ r_t)ᵀ (GDN-2's erase gate, Preconditioned DeltaNet's
    preconditioned write key); None: r = k, the delta rule itself.
    Returns o [B, T, H, V] in q's dtype and, if asked, the final state [B, H, K, V] (compute dtype)."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    per_channel = g is not None and g.dim() == 4
    sub = sub_chunk_length(chunk_size, sub_chunk_size) if per_channel else 1
    chunk = Chunker(q.shape[1], chunk_size, dtype, sub)
    qc, kc, vc, bc = chunk(q) * scale, chunk(k), chunk(v), chunk(beta)  # [B, H, N, C, *]; bc [.., C, 1]
    gc = chunk(g) if g is not None else torch.zeros_like(bc)
    rc = kc if read_key is None else chunk(read_key)  # the read key r (the written one, k, by default)
    cum = gc.cumsum(-2)  # [B, H, N, C, K or 1], non-increasing down the chunk
    if per_channel:
        (kk,), (qk,) = per_channel_scores([rc, qc], [kc], cum, cum, sub)  # [B, H, N, C, C], lower
        kk = kk.tril(-1)  # strictly lower
    else:
        inclusive = pair_decay(cum, cum, strict=False)  # exp(B_t - B_s), s <= t
        kk = decayed_scores(rc, kc, inclusive).tril(-1)  # [B, H, N, C, C], strictly lower
        qk = decayed_scores(qc, kc, inclusive)  # lower, diagonal included
    state = initial_state_or_zeros(q, v.shape[-1], initial_state, dtype)
    # the WY solve, the loop over chunks and the output
    out, state = delta_rule_chunks(qc, kc, vc, bc, cum, kk, qk, state, None if read_key is None else rc)
    out = chunk.unchunk(out).to(q.dtype)
    return out, state if output_final_state else None


def delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    state: Tensor,
    scale: float | None = None,
    read_key: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step. q/k [B, H, K], v [B, H, V], β [B, H], g None/[B, H]/[B, H, K], state [B, H, K, V];
    `read_key` [B, H, K] as in `chunk_delta_rule` (None: k)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = state.dtype
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    read = k if read_key is None else read_key.to(dtype)
    if g is not None:
        decay = g.to(dtype).exp()
        state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    u = beta[..., None] * (v - (read[..., None, :] @ state).squeeze(-2))  # [B, H, V]
    state = state + k[..., :, None] * u[..., None, :]
    out = scale * (q[..., None, :] @ state).squeeze(-2)
    return out, state


def chunk_dplr(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 32,
    sub_chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked diagonal-plus-low-rank rule S_t = D_t S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ (RWKV-7's
    generalised delta rule; fla's `dplr_recurrence` convention: the low-rank term reads the undecayed
    S_{t-1}). g [B, T, H, K]. With h_t = S_{t-1}ᵀ a_t, every S_t = Γ_t S₀ + Σ_s (Γ_t/Γ_s)(b_s h_sᵀ + k_s v_sᵀ),
    and the h of a chunk solve (I − A_ab) H = Ã S₀ + A_ak V with A_xy[t, s] = Σ a_t y_s exp(B_{t−1} − B_s)."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sub = sub_chunk_length(chunk_size, sub_chunk_size)
    chunk = Chunker(q.shape[1], chunk_size, dtype, sub)
    qc, kc, vc, ac, bc, gc = (chunk(t) for t in (q, k, v, a, b, g))
    qc = qc * scale
    cum = gc.cumsum(-2)  # B_t
    before = cum - gc  # B_{t-1}
    # A_ab, A_ak with the decay exp(B_{t−1} − B_s), s < t; A_qb, A_qk with exp(B_t − B_s), s <= t
    ((ab, ak),) = per_channel_scores([ac], [bc, kc], before, cum, sub, strict=True)
    ((qb, qk),) = per_channel_scores([qc], [bc, kc], cum, cum, sub)
    solve = unit_lower_inverse(-ab)  # (I − A_ab)⁻¹
    w_state = solve @ (ac * before.exp())  # H = w_state S₀ + w_values
    w_values = solve @ (ak @ vc)
    last = cum[..., -1:, :]
    to_end = (last - cum).exp()
    b_end = bc * to_end
    chunk_kv = (kc * to_end).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    chunk_decay = last.transpose(-1, -2).exp()  # [B, H, N, K, 1]
    state = initial_state_or_zeros(q, v.shape[-1], initial_state, dtype)
    # per chunk: H = W_values + W_state S (the h_t rows), S <- decay · S + B_endᵀ H + (chunk's k vᵀ)
    entering, lowrank, state = carry_with_readout(w_values, w_state, b_end, chunk_decay, chunk_kv, state)
    out = (qc * cum.exp()) @ entering + qb @ lowrank + qk @ vc  # [B, H, N, C, V]
    return chunk.unchunk(out).to(q.dtype), state if output_final_state else None


def dplr_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One DPLR decode step. q/k/a/b/g [B, H, K], v [B, H, V], state [B, H, K, V]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = state.dtype
    q, k, v, a, b, g = (t.to(dtype) for t in (q, k, v, a, b, g))
    lowrank = (a[..., None, :] @ state).squeeze(-2)  # aᵀ S_{t-1}: [B, H, V]
    state = (
        g.exp()[..., None] * state
        + b[..., :, None] * lowrank[..., None, :]
        + k[..., :, None] * v[..., None, :]
    )
    return scale * (q[..., None, :] @ state).squeeze(-2), state

"""PaTH attention in plain PyTorch: the blockwise (UT-transform) form and the decode step.

Per key head, every token s carries a generalised Householder matrix H_s = I − β_s w_s w_sᵀ (w unit norm,
β ∈ (0, 2)), and the logit of query i on key j <= i is

    a_ij = scale · (q_iᵀ H_i H_{i−1} ⋯ H_{j+1} k_j + G_i − G_j)   (G: cumulative log forget gate, optional)

followed by a causal softmax over j and the values (the scale multiplies the gate term too, as in fla's
kernels and decoding). Decoding keeps every cached key already transformed to the newest token
(k_j ← H_t k_j at each step), so a step is ordinary attention over that cache.

Blockwise form, chunks of C tokens. Inside a chunk the running product H_t ⋯ H_1 = I − Σ_{s<=t} w_s u_sᵀ
with U = T diag(β) W and T = (I + L)⁻¹, L_ts = β_t w_t·w_s (s < t) — one unit-triangular solve (the UT
transform, as for the delta rule). From it, per chunk:
  - in-chunk logits  Q Kᵀ − tril(Q Wᵀ) X, with X = T diag(β) strict_tril(W Kᵀ) (x_sj: how far H_s moves k_j);
  - keys carried to their chunk's end  K̃ = K − Xᵀ W;
  - queries pulled back through their chunk's prefix  Q̃ = Q − tril(Q Wᵀ) U;
  - the whole chunk's product  P = I − Wᵀ U.
The logits of query chunk n on key chunk m < n are R K̃_mᵀ with the rows R = Q̃_n P_{n−1} ⋯ P_{m+1}:
one loop over the chunk distance n − m multiplies every query chunk's rows by one more P at once.
Layout: q [B, Tq, HQ, D] (the last Tq of the Tk positions), k/v/w [B, Tk, H, D], β [B, Tk, H], gates
[B, T, HQ]; HQ a multiple of H (grouped heads). Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.attention import with_key_mask
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker


def _chunk_transforms(k: Tensor, w: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per chunk (inputs [B, H, N, C, D], β [.., C, 1]): U = T diag(β) W, X = T diag(β) strict_tril(W Kᵀ)
    and the keys carried to their chunk's end K̃ = K − Xᵀ W."""
    size = k.shape[-2]
    eye = torch.eye(size, dtype=k.dtype, device=k.device)
    unit_lower = eye + (beta * (w @ w.transpose(-1, -2))).tril(-1)
    rhs = torch.cat([beta * w, beta * (w @ k.transpose(-1, -2)).tril(-1)], dim=-1)  # [.., C, D + C]
    solved = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True)
    u, x = solved.split([w.shape[-1], size], dim=-1)
    return u, x, k - x.transpose(-1, -2) @ w


def _keys_to_end(k_chunk_end: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """Keys carried through every later chunk to the sequence end: row form k ← k (I − Wᵀ U)ᵀ per chunk
    after its own, from the last chunk backwards. [B, H, N, C, D] -> same."""
    carried, transform = [k_chunk_end[:, :, -1]], None
    for n in range(k_chunk_end.shape[2] - 2, -1, -1):
        w_n, u_n = w[:, :, n + 1], u[:, :, n + 1]
        step = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device) - u_n.transpose(-1, -2) @ w_n  # Pᵀ
        transform = step if transform is None else step @ transform
        carried.append(k_chunk_end[:, :, n] @ transform)
    return torch.stack(carried[::-1], dim=2)


def path_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    gate_q: Tensor | None = None,
    gate_k: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    output_keys: bool = False,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """PaTH attention (module docstring) of q, the last Tq positions, over all Tk keys. gate_q/gate_k: the
    cumulative log forget gates G at the query and key positions (None: no gate). key_mask [B, Tk] (True =
    real token): the pad keys of a padded batch are not attended. Returns o [B, Tq, HQ, D]
    in q's dtype and, with `output_keys`, the keys carried to position Tk [B, Tk, H, D] (the decode cache)."""
    dtype = compute_dtype(q.dtype)
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    chunk = Chunker(k_len, chunk_size, dtype)
    kc, wc, bc = chunk(k), chunk(w), chunk(beta)  # [B, H, N, C, D], β [.., C, 1]
    u, x, k_end = _chunk_transforms(kc, wc, bc)
    q_full = F.pad(q.to(dtype), (0, 0, 0, 0, k_len - q_len, 0))  # queries at the last q_len positions
    qc = chunk(q_full)  # [B, HQ, N, C, D]

    def per_query_head(t: Tensor) -> Tensor:
        return t.repeat_interleave(group, dim=1) if group > 1 else t

    kc_q, wc_q, u_q, x_q, k_end_q = (per_query_head(t) for t in (kc, wc, u, x, k_end))
    qw = (qc @ wc_q.transpose(-1, -2)).tril()  # q_i·w_s, s <= i
    local = qc @ kc_q.transpose(-1, -2) - qw @ x_q  # [B, HQ, N, C, C]
    rows = qc - qw @ u_q  # Q̃
    bands = [local]
    chunks = kc.shape[2]
    for distance in range(1, chunks):
        rows = rows[:, :, 1:]  # query chunks n >= distance
        bands.append(
            F.pad(rows @ k_end_q[:, :, : chunks - distance].transpose(-1, -2), (0, 0, 0, 0, distance, 0))
        )
        w_m, u_m = wc_q[:, :, : chunks - distance], u_q[:, :, : chunks - distance]
        rows = rows - (rows @ w_m.transpose(-1, -2)) @ u_m  # one more chunk's product, for distance + 1
    band = torch.stack(bands, dim=2)  # [B, HQ, distance, n, C, C]: logits of chunk n on chunk n − distance
    index = torch.arange(chunks, device=q.device)
    offset = (index[:, None] - index[None, :]).clamp(min=0)  # [n, m] -> distance
    logits = band[:, :, offset, index[:, None].expand(chunks, chunks)]  # [B, HQ, n, m, C, C]
    padded = chunks * chunk.size
    logits = logits.permute(0, 1, 2, 4, 3, 5).reshape(batch, q_heads, padded, padded)
    logits = logits[:, :, k_len - q_len : k_len, :k_len]  # [B, HQ, Tq, Tk]
    if gate_q is not None:
        gate_q, gate_k = gate_q.to(dtype).transpose(1, 2), gate_k.to(dtype).transpose(1, 2)  # [B, HQ, T]
        logits = logits + gate_q[..., None] - gate_k[..., None, :]
    logits = logits * scale
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    causal = with_key_mask(causal, key_mask, k_len - q_len)  # [Tq, Tk] or [B, 1, Tq, Tk]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    out = probs @ per_query_head(v.to(dtype).transpose(1, 2))  # [B, HQ, Tq, D]
    out = out.transpose(1, 2).to(q.dtype)
    if not output_keys:
        return out, None
    return out, chunk.unchunk(_keys_to_end(k_end, wc, u))


def path_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    gate: Tensor | None,
    cache: dict[str, Tensor],
    scale: float | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One decode step: q [B, HQ, D], k/v/w [B, H, D], β [B, H], gate (G_t) [B, HQ] or None; cache `k`
    (keys carried to the previous token) and `v` [B, Tc, H, D], `gate` [B, Tc, HQ] when gated; key_mask
    [B, Tc + 1] (True = real token) masks a padded prefill's pad keys. Returns o [B, HQ, D] and the
    updated cache."""
    dtype = cache["k"].dtype
    q, k, v, w, beta = (t.to(dtype) for t in (q, k, v, w, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    past = cache["k"]
    past = past - beta[:, None, :, None] * (past * w[:, None]).sum(-1, keepdim=True) * w[:, None]  # H_t k_j
    new = {
        "k": torch.cat([past, k[:, None]], dim=1),
        "v": torch.cat([cache["v"], v[:, None].to(cache["v"].dtype)], dim=1),
    }
    group = q.shape[1] // k.shape[1]
    keys = new["k"].repeat_interleave(group, dim=2) if group > 1 else new["k"]  # [B, T, HQ, D]
    values = new["v"].to(dtype).repeat_interleave(group, dim=2) if group > 1 else new["v"].to(dtype)
    logits = torch.einsum("bhd,bthd->bht", q, keys)
    if gate is not None:
        new["gate"] = torch.cat([cache["gate"], gate[:, None].to(cache["gate"].dtype)], dim=1)
        logits = logits + gate.to(dtype)[..., None] - new["gate"].to(dtype).transpose(1, 2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    out = torch.einsum("bht,bthd->bhd", (scale * logits).softmax(-1), values)
    return out, new

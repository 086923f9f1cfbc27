"""DeltaFormer attention in plain PyTorch (Zhong et al., 2025; fla's `naive_deltaformer_attn` semantics).

A delta rule run inside softmax attention. Each token first writes a corrected value

    u_t = v_t − β_t Σ_{s<t} p_ts u_s,      p_ts = softmax_{s<t}(q_t·k_s / √d)     (none before: u = v)

then reads with ordinary causal softmax attention over the corrected values, o_t = Σ_{s<=t}
softmax_{s<=t}(q_t·k_s / √d) u_s. Stacking the writes, (I + diag(β) P) u = v with P strictly lower
triangular, so u is one unit-lower-triangular solve (`torch.linalg.solve_triangular`) rather than a
token loop: O(T²·d) work in parallel. With `past` cached tokens the new block solves against the cached
u: (I + diag(β) P_new,new) u_new = v_new − diag(β) P_new,past u_past. Pad keys (`key_mask`) take no
weight in either softmax, so a left-padded row equals the row alone; a pad query reads its own key only.
fp32 (fp64 for fp64 inputs); grouped k/v heads are shared by their query heads, u is per query head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.nsa import masked_softmax


def deltaformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    u_past: Tensor,
    key_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """q [B, H, Tq, D], beta [B, H, Tq]; k [B, H_kv, Tk, D] with the `past` = Tk − Tq cached keys first;
    v [B, H_kv, Tq, D] this call's values; u_past [B, H, past, D] the cached corrected values; key_mask
    [B, Tk] (True = real token). Returns (o [B, H, Tq, D] in q's dtype, u [B, H, Tk, D] in the compute
    dtype: the cache to keep)."""
    dtype = compute_dtype(q.dtype)
    batch, heads, seq_len, dim = q.shape
    total = k.shape[2]
    past = total - seq_len
    scale = dim**-0.5 if scale is None else scale
    groups = heads // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    logits = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    ones = torch.ones(seq_len, total, dtype=torch.bool, device=q.device)
    real = torch.ones(batch, total, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    earlier = ones.tril(diagonal=past - 1) & real[:, None, :]  # [B, Tq, Tk]: strictly earlier real keys
    p = masked_softmax(logits, earlier[:, None]) * beta.to(dtype)[..., None]  # β_t p_ts
    u_past = u_past.to(dtype)
    rhs = v - p[..., :past] @ u_past  # [B, H, Tq, D]
    system = torch.eye(seq_len, dtype=dtype, device=q.device) + p[..., past:]  # unit lower triangular
    u_new = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u = torch.cat([u_past, u_new], dim=2)  # [B, H, Tk, D]
    own = ones.tril(diagonal=past) & ~ones.tril(diagonal=past - 1)  # a pad query's only key
    visible = (ones.tril(diagonal=past) & real[:, None, :]) | own
    o = masked_softmax(logits, visible[:, None]) @ u
    return o.to(q.dtype), u

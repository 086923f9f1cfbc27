"""Stick-breaking attention in plain PyTorch, in log space (Tan et al., 2024; fla's naive form).

Query i gives each visible key j the weight

    A_ij = σ(z_ij) · Π_{j<l, l visible} (1 − σ(z_il)),     z_ij = scale · q_i·k_j (+ an additive bias)

— walking back from the query, each key takes a sigmoid share of the stick the nearer keys left. Keys
visible to query i are j < i (j <= i with `attend_current`), minus the pad keys of a padded batch
(`key_mask`); an invisible key takes no share and leaves the stick unchanged, so a left-padded row's
weights are exactly those of the row alone. The weights are not normalised (a query may leave stick
unused; the first query, seeing nothing without `attend_current`, outputs 0). In log space:
log A_ij = logσ(z_ij) + Σ_{l>j} log(1 − σ(z_il)) over visible l (an exclusive suffix sum, computed directly
rather than as a difference of sums). Materialises [B, H, Tq, Tk]; fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype

FUSED_KERNEL = ("stickbreaking_attn", "parallel_stickbreaking_attn")  # fla.ops.stickbreaking_attn


def visible_keys(seq_len: int, total: int, past: int, attend_current: bool, key_mask: Tensor | None, device):
    """[Tq, Tk] or [B, 1, Tq, Tk] bool: the keys each of the last Tq queries (absolute past + i) sees."""
    mask = torch.ones(seq_len, total, dtype=torch.bool, device=device)
    mask = mask.tril(diagonal=past if attend_current else past - 1)
    return mask if key_mask is None else mask & key_mask[:, None, None, :]


def stickbreaking_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int,
    attend_current: bool,
    key_mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """q [B, H, Tq, D]; k [B, H_kv, Tk, D], v [B, H_kv, Tk, Dv] with H_kv dividing H; the queries are the
    last Tq of the Tk positions (`past` earlier ones cached). key_mask [B, Tk] (True = real token), bias
    [H, Tq, Tk] additive on the logits, scale default 1/sqrt(D). Returns [B, H, Tq, Dv] in q's dtype."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    logits = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias.to(dtype)
    visible = visible_keys(q.shape[2], k.shape[2], past, attend_current, key_mask, q.device)
    log_keep = F.logsigmoid(-logits).masked_fill(~visible, 0.0)  # log(1 − σ(z)), 0 where invisible
    after = log_keep.flip(-1).cumsum(-1).flip(-1)  # Σ_{l>=j}
    after = F.pad(after[..., 1:], (0, 1))  # Σ_{l>j}
    weights = (F.logsigmoid(logits) + after).masked_fill(~visible, float("-inf")).exp()
    return (weights @ v).to(q.dtype)

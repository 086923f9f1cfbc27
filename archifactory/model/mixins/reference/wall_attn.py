"""Wall attention in plain PyTorch: softmax attention whose logits decay per key channel (fla's naive form).

With a per-channel log-decay g_t <= 0 [K] per query head and its running sum P_t = Σ_{s<=t} g_s, the logit
of query i for key j <= i is

    z_ij = scale · Σ_n q_in k_jn exp(P_in − P_jn)   (+ C_i − C_j with the optional scalar gate, C = Σ gs)

— each key channel fades with the distance it has travelled under its own gate (the per-channel analogue
of FoX's scalar forget gate, which the optional C term adds), then a softmax over the visible keys. fla
works in log2 units; the softmax is the same.

exp(P_i − P_j) factorises as exp(P_i − A) · exp(A − P_j) for any anchor A, but both factors stay <= 1 only
when A lies between P_i and P_j. So the queries are cut into blocks; a block's anchor is P at its first
query: every earlier key gets k_j exp(A − P_j) and every query of the block q_i exp(P_i − A) (all exponents
<= 0), while the keys inside the block are scored pairwise with the [C, C, K] decays masked before the exp,
as the chunked GLA references do. Nothing overflows however long the sequence or strong the decay; the work
is attention's plus one rescale of the earlier keys per block. Materialises [B, H, C, Tk] per block; fp32
(fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype

FUSED_KERNEL = ("wall_attn", "parallel_wall_attn")  # fla.ops.wall_attn.parallel_wall_attn


def block_logits(q: Tensor, k: Tensor, decay: Tensor, start: int, stop: int) -> Tensor:
    """The decayed q·k of the queries at absolute positions start..stop−1 (q [B, H, c, K]) against every key
    up to stop − 1 (k, decay [B, H, Tk, K], decay = P): [B, H, c, stop], unscaled; keys after a query are
    scored too (finite, to be masked)."""
    anchor = decay[:, :, start : start + 1]  # [B, H, 1, K]
    inside = decay[:, :, start:stop]  # [B, H, c, K]
    earlier = (q * (inside - anchor).exp()) @ (
        k[:, :, :start] * (anchor - decay[:, :, :start]).exp()
    ).transpose(-1, -2)  # [B, H, c, start]
    size = stop - start
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    pair = (inside[..., :, None, :] - inside[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    own = torch.einsum("bhik,bhjk,bhijk->bhij", q, k[:, :, start:stop], pair.exp())  # [B, H, c, c]
    return torch.cat([earlier, own], dim=-1)


def wall_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    visible: Tensor,
    gate: Tensor | None = None,
    bias: Tensor | None = None,
    block: int = 64,
    scale: float | None = None,
) -> Tensor:
    """q [B, H, Tq, K]: the last Tq of Tk positions; k [B, H_kv, Tk, K], v [B, H_kv, Tk, V] with H_kv
    dividing H; decay P [B, H, Tk, K] and gate C [B, H, Tk] (or None): running sums of the log-decays at
    every key position; visible [Tq, Tk] or [B, 1, Tq, Tk] (True = attend, at least one key per query);
    bias [H, Tq, Tk] additive. scale default 1/sqrt(K). Returns [B, H, Tq, V] in q's dtype."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    q, decay = q.to(dtype), decay.to(dtype)
    past = k.shape[2] - q.shape[2]
    outputs = []
    for first in range(0, q.shape[2], block):
        last = min(first + block, q.shape[2])
        start, stop = past + first, past + last  # absolute positions of this block's queries
        logits = block_logits(q[:, :, first:last], k, decay, start, stop) * scale  # [B, H, c, stop]
        if gate is not None:
            gate_d = gate.to(dtype)
            logits = logits + gate_d[:, :, start:stop, None] - gate_d[:, :, None, :stop]
        if bias is not None:
            logits = logits + bias[:, first:last, :stop].to(dtype)
        mask = visible[..., first:last, :stop]
        weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        outputs.append(weights @ v[:, :, :stop])
    return torch.cat(outputs, dim=2).to(out_dtype)

"""Log-linear attention with its own position counter per row: padded batches and their decode steps.

`log_linear.py` places every row of a call at the same positions [start, start + T), given as Python
ints. In a padded batch that is wrong: a row's Fenwick buckets must follow the positions of its REAL tokens
(a left-padded row's first token is position 0 of the row run alone, not its index in the batch), and
after a padded prefill the rows of a decode step sit at different positions. Here each row b starts at
its own `start[b]` (a tensor: the real tokens the row has seen) and token t of the call sits at
start[b] + (real tokens before t in the row). A pad takes the position of the row's next real token and
does not advance the counter; the caller makes it an identity step of the recurrence (v = 0, g = 0, what
the kit's `zero_pads` gives), so it adds nothing to any bucket and decays nothing. A row thus ends in the
slots of the row run alone, whatever its pads, left or right.

Same math as `log_linear.py` (read its docstring for the levels, the slots and the merges), vectorized
over rows: the level maps are [B, C, C] / [B, C, S] tensors instead of Python-int tables, the held slots
a [B, S] bit mask instead of an index list, the slots' merge a mask (moving from position s to e, the
slots below the highest bit h of s XOR e merge into slot h, the others stay) and the tokens' a one-hot
[B, S, C], so nothing reads a position back to the host (decode steps stay compile-clean). Pieces are
cut every `chunk_size` tokens of the call (any cut is exact: a query sees a whole bucket at one level).
The price over `log_linear.py`, which touches only the set slots: every piece reads, decays and spreads
its tokens over all S slots (S = num_levels − 1; the clear ones weigh 0), a few times the slot traffic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.log_linear import bit_length
from archifactory.model.mixins.reference.simple_gla import expand_heads


def _piece_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    lam: Tensor,
    slots: Tensor,
    pos: Tensor,
    begin: Tensor,
    end: Tensor,
) -> tuple[Tensor, Tensor]:
    """One piece of C tokens at per-row positions pos [B, C], after the buckets `slots` [B, H, S, K, V] of
    each row's [0, begin[b]); the piece's real tokens end the row at end[b]. Inputs head-major as in
    `log_linear._piece`. Returns (o [B, H, C, V], the slots of each row's [0, end[b]))."""
    heads, size, levels, count = q.shape[1], q.shape[2], lam.shape[-1], slots.shape[2]
    gc = g.cumsum(-1)  # [B, H, C]: log-decay from the row's last token before the piece
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    level = bit_length(torch.bitwise_xor(pos[:, :, None], pos[:, None, :]), levels)  # [B, C, C]
    weight = lam.gather(-1, level[:, None].expand(-1, heads, -1, -1))  # λ_{ℓ(i,j)}(i)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = ((q @ k.transpose(-1, -2)) * weight * decay) @ v

    bit = torch.arange(count, device=q.device)
    held = ((begin[:, None] >> bit) & 1).bool()  # [B, S]: slot b holds a bucket iff bit b of begin is set
    roots = (begin[:, None] >> (bit + 1)) << (bit + 1)  # [B, S]: r_b, the first position of bucket b
    past_level = bit_length(torch.bitwise_xor(pos[:, :, None], roots[:, None, :]), levels)  # [B, C, S]
    past_weight = lam.gather(-1, past_level[:, None].expand(-1, heads, -1, -1)) * gc.exp()[..., None]
    past_weight = past_weight * held[:, None, None, :].to(lam.dtype)  # a clear slot holds nothing
    rows = (q[..., None, :] * past_weight[..., None]).flatten(-2)  # [B, H, C, S·K]
    out = out + rows @ slots.flatten(2, 3)  # [B, H, S·K, V]
    return out, _advance(k, v, gc, slots, pos, begin, end, held)


def _advance(
    k: Tensor, v: Tensor, gc: Tensor, slots: Tensor, pos: Tensor, begin: Tensor, end: Tensor, held: Tensor
) -> Tensor:
    """The slots of each row's [0, end) from those of [0, begin) (`held` [B, S] marks the set ones) and the
    piece's keys k [B, H, C, K] and values v at positions pos [B, C], gc the piece's cumulative log-decay.

    With h the highest bit where begin and end differ (h = -1: no real token, nothing moves), the slots
    below h merge into slot h (clear in begin) and those above stay; a token at position p joins slot
    bit_length(end XOR p) − 1 (none for a pad at `end`; a pad's v is 0 anyway). Written as few passes
    over the [B, H, S, K, V] slots as possible: they dominate a decode step."""
    batch, heads, count, key_dim, value_dim = slots.shape
    bit = torch.arange(count, device=slots.device)
    high = bit_length(torch.bitwise_xor(begin, end), count + 1)[:, None] - 1  # [B, 1]
    decay = gc[..., -1].exp()  # [B, H]: the whole piece's decay
    keep = (held & (bit > high)).to(slots.dtype)[:, None] * decay[..., None]  # [B, H, S]
    fold = (held & (bit < high)).to(slots.dtype)[:, None] * decay[..., None]
    carried = slots * keep[..., None, None]
    merged = (fold[:, :, None] @ slots.flatten(3)).to(slots.dtype)  # autocast may have run it in bf16
    merged = merged.view(batch, heads, 1, key_dim, value_dim)
    into = high.clamp(min=0)[:, None, :, None, None].expand(-1, heads, -1, key_dim, value_dim)
    carried = carried.scatter_add_(2, into, merged)  # h = -1 folds nothing: merged is 0
    joins = bit_length(torch.bitwise_xor(end[:, None], pos), count + 1) - 1  # [B, C]: each token's slot
    member = (joins[:, None, :] == bit[:, None]).to(k.dtype)  # [B, S, C]
    weighted = (k * (gc[..., -1:] - gc).exp()[..., None]).transpose(-1, -2)  # k_j · exp(G_end − G_j)
    spread = (member[:, None, :, None, :] * weighted[:, :, None]).reshape(batch * heads, -1, pos.shape[1])
    flat = carried.view(batch * heads, count * key_dim, value_dim)
    return flat.baddbmm_(spread, v.reshape(batch * heads, -1, value_dim)).view(slots.shape)


def chunk_log_linear_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    lam: Tensor,
    start: Tensor,
    real: Tensor | None,
    slots: Tensor,
    chunk_size: int = 64,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-linear attention (layout as `log_linear.chunk_log_linear`) of a call whose rows continue from
    their own positions start [B] (long) and buckets `slots` [B, H, S, K, V]; `real` [B, T] bool marks the
    real tokens (None: all real), whose v and g the caller has zeroed at the pads. Returns o [B, T, H, V]
    in q's dtype, the slots after the call in the compute dtype, and each row's new position [B]."""
    dtype = compute_dtype(q.dtype)
    heads, length = v.shape[2], q.shape[1]

    def head_major(t: Tensor) -> Tensor:
        return t.to(dtype).transpose(1, 2)

    qh = head_major(expand_heads(q, heads, 2)) * scale
    kh = head_major(expand_heads(k, heads, 2))
    vh, gh, lh = head_major(v), head_major(g), head_major(lam)  # [B, H, T, ...]
    counts = torch.ones_like(q[..., 0, 0], dtype=torch.long) if real is None else real.long()  # [B, T]
    bounds = torch.cat([start[:, None], start[:, None] + counts.cumsum(1)], dim=1)  # [B, T + 1]
    slots = slots.to(dtype)
    outputs = []
    for first in range(0, length, chunk_size):
        last = min(length, first + chunk_size)
        out, slots = _piece_rows(
            qh[:, :, first:last], kh[:, :, first:last], vh[:, :, first:last], gh[:, :, first:last],
            lh[:, :, first:last], slots, bounds[:, first:last], bounds[:, first], bounds[:, last],
        )  # fmt: skip
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype), slots, bounds[:, -1]

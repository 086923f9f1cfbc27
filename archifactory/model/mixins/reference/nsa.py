"""Native Sparse Attention in plain PyTorch (Yuan et al., 2025; fla's `naive_nsa` semantics).

Three branches over the same keys, mixed per query head by sigmoid gates:

- compressed: the keys and values mean-pooled over blocks of `block_size` real tokens; query t attends
  (softmax) to the blocks that are complete by t, i.e. (c + 1)·block_size − 1 <= t; none visible -> 0;
- selected: per key head, each block is scored by the compressed attention probability averaged over the
  query heads of its group; the first block, the query's own block and the one before are forced in
  (score 1); the top `block_counts` blocks that are visible or forced are kept and the query attends
  (softmax, causal) to every key in them;
- sliding: softmax attention over the last `window` keys (itself included); window 0 = no branch.

Positions are counted over each row's real tokens (`key_mask`), so blocks start at a row's first real
token and a left-padded row equals the row alone; a pad query attends to its own key only, so its output
stays finite (it is never used). Dense [Tq, Tk] masks per key head, taken over query chunks of
`QUERY_CHUNK` to bound the temporaries; fp32 (fp64 for fp64 inputs). The selected and sliding softmaxes
run explicitly (`reference`, the oracle) or through SDPA with their boolean masks (`sdpa`: the same math in
torch's fused CPU kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype

QUERY_CHUNK = 512


def real_positions(key_mask: Tensor | None, batch: int, total: int, device: torch.device) -> Tensor:
    """[B, Tk] long: each key's index among its row's real tokens; -1 at pads (and before a first one)."""
    if key_mask is None:
        return torch.arange(total, device=device).expand(batch, total)
    return torch.where(key_mask, key_mask.long().cumsum(-1) - 1, -1)


def block_members(positions: Tensor, block_size: int, num_blocks: int, dtype: torch.dtype) -> Tensor:
    """[B, NC, Tk] 0/1: key j belongs to block c = position // block_size (pads to none)."""
    blocks = torch.where(positions >= 0, torch.div(positions, block_size, rounding_mode="floor"), -1)
    index = torch.arange(num_blocks, device=positions.device)
    return (blocks[:, None, :] == index[None, :, None]).to(dtype)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis of the True entries; a row without one gives zeros (no NaN)."""
    fill = torch.finfo(logits.dtype).min
    return logits.masked_fill(~mask, fill).softmax(-1).masked_fill(~mask, 0.0)


def select_blocks(
    probs: Tensor, visible: Tensor, q_pos: Tensor, block_counts: int, block_size: int
) -> Tensor:
    """[B, H_kv, Tq, NC] bool: the blocks each query's group selects. probs [B, H_kv, G, Tq, NC] (the
    compressed attention), visible [B, Tq, NC], q_pos [B, Tq]."""
    num_blocks = probs.shape[-1]
    index = torch.arange(num_blocks, device=probs.device)
    own = torch.div(q_pos, block_size, rounding_mode="floor")[:, :, None]  # [B, Tq, 1]
    forced = (index == own) | (index == 0) | (index == own - 1)  # [B, Tq, NC]
    scores = probs.mean(2).masked_fill(forced[:, None], 1.0)  # [B, H_kv, Tq, NC]
    top = scores.topk(min(block_counts, num_blocks), dim=-1).indices
    allowed = (visible | forced)[:, None].expand(scores.shape)
    return torch.zeros_like(allowed).scatter(-1, top, allowed.gather(-1, top))


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, logits: Tensor, mask: Tensor, scale: float, backend: str
):
    """Softmax attention of q [B, H_kv, G, Tc, D] over k, v [B, H_kv, Tk, D] under the boolean `mask`
    (broadcast to [B, H_kv, G, Tc, Tk], at least one True per row): explicitly from the `logits` or, with
    `sdpa`, SDPA on the heads flattened as [H_kv, G] (kv head h // G: SDPA's enable_gqa layout)."""
    if backend != "sdpa":
        return masked_softmax(logits, mask) @ v[:, :, None]
    flat = q.flatten(1, 2)  # [B, H, Tc, D]
    mask = mask.expand(*q.shape[:4], k.shape[2]).flatten(1, 2)
    y = F.scaled_dot_product_attention(flat, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[2] > 1)
    return y.view(q.shape)


def nsa_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pooled: tuple[Tensor, Tensor, Tensor],
    positions: Tensor,
    start: int,
    options: tuple[int, int, int, float, str],
) -> tuple[Tensor, Tensor, Tensor]:
    """The three branches for the queries q [B, H_kv, G, Tc, D] at key indices start .. start + Tc − 1
    over k, v [B, H_kv, Tk, D]; pooled = (k_cmp, v_cmp [B, H_kv, NC, D], members [B, NC, Tk]); options =
    (block_size, block_counts, window, scale, backend). Returns (o_cmp, o_slc, o_swa), each
    [B, H_kv, G, Tc, D]."""
    block_size, block_counts, window, scale, backend = options
    k_cmp, v_cmp, members = pooled
    count, total = q.shape[3], k.shape[2]
    q_pos = positions[:, start : start + count]  # [B, Tc]
    ends = (torch.arange(k_cmp.shape[2], device=q.device) + 1) * block_size - 1
    visible = ends[None, None, :] <= q_pos[:, :, None]  # [B, Tc, NC]: complete blocks only
    probs = masked_softmax((q @ k_cmp[:, :, None].transpose(-1, -2)) * scale, visible[:, None, None])
    o_cmp = probs @ v_cmp[:, :, None]
    selected = select_blocks(probs, visible, q_pos, block_counts, block_size)  # [B, H_kv, Tc, NC]
    ones = torch.ones(count, total, dtype=torch.bool, device=q.device)
    causal = ones.tril(diagonal=start)  # [Tc, Tk]
    own = causal & ~ones.tril(diagonal=start - 1)  # query <-> its own key: a pad query's only key
    real = (positions >= 0)[:, None, :] & causal  # [B, Tc, Tk]
    in_selected = (selected.to(k.dtype) @ members[:, None]) > 0  # [B, H_kv, Tc, Tk]
    logits = (
        None if backend == "sdpa" else (q @ k[:, :, None].transpose(-1, -2)) * scale
    )  # [B, H_kv, G, Tc, Tk]
    o_slc = masked_attention(
        q, k, v, logits, ((in_selected & real[:, None]) | own)[:, :, None], scale, backend
    )
    if window == 0:
        return o_cmp, o_slc, torch.zeros_like(o_slc)
    near = positions[:, None, :] > q_pos[:, :, None] - window  # [B, Tc, Tk]
    o_swa = masked_attention(q, k, v, logits, ((near & real) | own)[:, None, None], scale, backend)
    return o_cmp, o_slc, o_swa


def native_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    past: int,
    options: tuple[int, int, int],
    key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "reference",
) -> Tensor:
    """q [B, H, Tq, D]; k, v [B, H_kv, Tk, D] (H_kv dividing H; the queries are the last Tq of the Tk
    positions, `past` earlier ones cached); gates [B, H, Tq, 3] = (compressed, selected, sliding) weights;
    options = (block_size, block_counts, window); key_mask [B, Tk] (True = real token); scale default
    1/sqrt(D); backend `reference` or `sdpa`. Returns [B, H, Tq, D] in q's dtype."""
    block_size, block_counts, window = options
    dtype = compute_dtype(q.dtype)
    batch, heads, seq_len, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    k, v = k.to(dtype), v.to(dtype)
    q5 = q.to(dtype).view(batch, kv_heads, heads // kv_heads, seq_len, dim)  # [B, H_kv, G, Tq, D]
    positions = real_positions(key_mask, batch, total, q.device)
    members = block_members(positions, block_size, -(-total // block_size), dtype)  # [B, NC, Tk]
    means = members / members.sum(-1, keepdim=True).clamp_min(1.0)
    pooled = (means[:, None] @ k, means[:, None] @ v, members)  # k_cmp, v_cmp [B, H_kv, NC, D]
    chunk_options = (block_size, block_counts, window, scale, backend)
    pieces = []
    for first in range(0, seq_len, QUERY_CHUNK):
        q_chunk = q5[:, :, :, first : first + QUERY_CHUNK]
        branches = torch.stack(nsa_chunk(q_chunk, k, v, pooled, positions, past + first, chunk_options), -1)
        pieces.append(branches)  # [B, H_kv, G, Tc, D, 3]
    branches = torch.cat(pieces, dim=3).view(batch, heads, seq_len, dim, 3)
    return (branches @ gates.to(dtype)[..., None]).squeeze(-1).to(q.dtype)

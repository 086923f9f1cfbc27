"""Mixture of Block Attention in plain PyTorch (Lu et al., 2025; fla's `parallel_moba` semantics).

The keys are cut into blocks of `block_size` real tokens. Query t attends (one softmax) to the keys of
its own block up to itself, plus every key of the `topk − 1` earlier blocks whose mean key scores highest
against it (q·mean(k), per query head); only blocks that ended before t compete, so there are fewer
when fewer exist. Positions are counted over each row's real tokens (`key_mask`), so blocks start at a
row's first real token and a left-padded row equals the row alone; a pad query attends to its own key
only (finite, never used). Dense [Tq, Tk] masks over query chunks of `QUERY_CHUNK`; fp32 (fp64 for fp64
inputs). The masked softmax runs as an explicit softmax (`reference`, the oracle) or through SDPA with a
boolean mask (`sdpa`: the same math in torch's fused CPU kernel, about twice as fast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.nsa import QUERY_CHUNK, block_members, real_positions


def moba_chunk(
    q: Tensor, k: Tensor, v: Tensor, k_mean: Tensor, members: Tensor, positions: Tensor, start: int, options
) -> Tensor:
    """Queries q [B, H_kv, G, Tc, D] at key indices start .. start + Tc − 1 over k, v [B, H_kv, Tk, D];
    k_mean [B, H_kv, NC, D] the block means, members [B, NC, Tk]; options = (block_size, topk, scale,
    backend). Returns [B, H_kv, G, Tc, D]."""
    block_size, topk, scale, backend = options
    count, total, num_blocks = q.shape[3], k.shape[2], k_mean.shape[2]
    q_pos = positions[:, start : start + count]  # [B, Tc]
    ends = (torch.arange(num_blocks, device=q.device) + 1) * block_size
    past_block = (ends[None, None, :] <= q_pos[:, :, None])[:, None, None]  # [B, 1, 1, Tc, NC]
    gate = (q @ k_mean[:, :, None].transpose(-1, -2)).masked_fill(~past_block, float("-inf"))
    top = gate.topk(min(topk - 1, num_blocks), dim=-1).indices  # [B, H_kv, G, Tc, k]
    chosen = past_block.expand(gate.shape)
    selected = torch.zeros_like(chosen).scatter(-1, top, chosen.gather(-1, top))
    in_selected = (selected.to(k.dtype) @ members[:, None, None]) > 0  # [B, H_kv, G, Tc, Tk]
    own_block = torch.div(q_pos, block_size, rounding_mode="floor")[:, :, None]  # [B, Tc, 1]
    key_block = torch.where(positions >= 0, torch.div(positions, block_size, rounding_mode="floor"), -1)
    same = (key_block[:, None, :] == own_block) & (positions >= 0)[:, None, :]  # [B, Tc, Tk]
    ones = torch.ones(count, total, dtype=torch.bool, device=q.device)
    causal = ones.tril(diagonal=start)
    own = causal & ~ones.tril(diagonal=start - 1)  # a pad query's only key
    mask = ((in_selected | same[:, None, None]) & causal) | own
    if backend == "sdpa":  # query heads flattened as [H_kv, G]: kv head h // G, SDPA's enable_gqa layout
        flat = q.flatten(1, 2)  # [B, H, Tc, D]
        mask = mask.expand(*q.shape[:4], total).flatten(1, 2)
        y = F.scaled_dot_product_attention(flat, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[2] > 1)
        return y.view(q.shape)
    logits = (q @ k[:, :, None].transpose(-1, -2)) * scale  # [B, H_kv, G, Tc, Tk]
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, None]


def moba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int,
    block_size: int,
    topk: int,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "reference",
) -> Tensor:
    """q [B, H, Tq, D]; k, v [B, H_kv, Tk, D] (H_kv dividing H; the queries are the last Tq of the Tk
    positions, `past` earlier ones cached); `topk` blocks per query counting its own (>= 2); key_mask
    [B, Tk] (True = real token); scale default 1/sqrt(D); backend `reference` or `sdpa`. Returns
    [B, H, Tq, D] in q's dtype."""
    dtype = compute_dtype(q.dtype)
    batch, heads, seq_len, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    k, v = k.to(dtype), v.to(dtype)
    q5 = q.to(dtype).view(batch, kv_heads, heads // kv_heads, seq_len, dim)  # [B, H_kv, G, Tq, D]
    positions = real_positions(key_mask, batch, total, q.device)
    members = block_members(positions, block_size, -(-total // block_size), dtype)  # [B, NC, Tk]
    k_mean = (members / members.sum(-1, keepdim=True).clamp_min(1.0))[:, None] @ k  # [B, H_kv, NC, D]
    options = (block_size, topk, scale, backend)
    pieces = [
        moba_chunk(
            q5[:, :, :, first : first + QUERY_CHUNK], k, v, k_mean, members, positions, past + first, options
        )
        for first in range(0, seq_len, QUERY_CHUNK)
    ]
    return torch.cat(pieces, dim=3).view(batch, heads, seq_len, dim).to(q.dtype)

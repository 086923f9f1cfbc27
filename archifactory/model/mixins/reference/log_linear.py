"""Log-linear attention in plain PyTorch: the Fenwick-tree hierarchy of gated linear-attention states.

Guo et al., "Log-Linear Attention" (2025). Query i splits its prefix [0, i] into the Fenwick (binary
indexed tree) buckets of its absolute position: key j < i falls in level ℓ(i, j) = bit_length(i XOR j)
(the highest bit where i and j differ, plus one), and j = i is level 0. Each level has its own data-
dependent weight λ_ℓ(i) >= 0 (taken at the query), on top of a gated linear attention's decay:

    o_i = Σ_{j<=i} λ_{ℓ(i,j)}(i) · exp(G_i − G_j) · (q_i·k_j) · v_j        (G: cumulative log-decay g)

With λ ≡ 1 this is simple GLA; the hierarchy costs O(log T) states per head instead of one.

State. After the tokens [0, s), the keys sit in one bucket per set bit b of s: [r_b, r_b + 2^b) with
r_b = s with bits 0..b cleared. The state keeps one [K, V] matrix per bit (slot b, zero where the bit is
clear), each summed as Σ_j exp(G_{s−1} − G_j) k_jᵀ v_j. A later query i >= s sees the whole of slot b at
the single level bit_length(i XOR r_b). Advancing to s' > s, buckets only merge: slot b moves to slot
bit_length(s' XOR r_b) − 1 and token j joins slot bit_length(s' XOR j) − 1.

Chunked form. The call is cut at absolute multiples of `chunk_size`; per piece, the in-piece keys are a
dense masked [C, C] product and the past keys one matmul over the set slots, then the slots merge as above
(a Python loop over pieces, like the other chunked references' carry). Level maps depend only on Python
ints, so nothing syncs with the host. Layout as fla's `chunk_log_linear_attn`: q/k [B, T, G, K] shared by
H / G consecutive heads, v [B, T, H, V], g [B, T, H], λ [B, T, H, L], state [B, H, S, K, V].
Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import expand_heads

FUSED_KERNEL = ("log_linear_attn", "chunk_log_linear_attn")  # fla.ops.log_linear_attn


def bit_length(x: Tensor, bits: int) -> Tensor:
    """Bit length of every entry of the non-negative integer tensor x (entries < 2**bits)."""
    powers = 2 ** torch.arange(bits, device=x.device)
    return (x[..., None] >= powers).sum(-1)


def _set_bits(n: int) -> list[int]:
    return [b for b in range(n.bit_length()) if n >> b & 1]


def _bucket_start(n: int, bit: int) -> int:
    """r_b: the first position of the bucket of bit `bit` in the Fenwick split of [0, n)."""
    return (n >> (bit + 1)) << (bit + 1)


def _piece(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, slots: Tensor, start: int
) -> tuple[Tensor, Tensor]:
    """One piece of C tokens at absolute positions [start, start + C), inside one aligned chunk. Inputs
    head-major: q/k [B, H, C, K], v [B, H, C, V], g [B, H, C], λ [B, H, C, L], slots [B, H, S, K, V] (the
    buckets of [0, start), decayed to start − 1). Returns (o [B, H, C, V], the slots of [0, start + C))."""
    size, levels = q.shape[2], lam.shape[-1]
    pos = torch.arange(start, start + size, device=q.device)
    gc = g.cumsum(-1)  # [B, H, C]: log-decay from start − 1 to each position
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    level = bit_length(torch.bitwise_xor(pos[:, None], pos[None, :]), levels)
    weight = lam.gather(-1, level.expand(*lam.shape[:2], size, size))  # λ_{ℓ(i,j)}(i)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = ((q @ k.transpose(-1, -2)) * weight * decay) @ v
    bits = _set_bits(start)
    if bits:  # the past: one level per set slot for each query
        index = torch.tensor(bits, device=q.device)
        roots = torch.tensor([_bucket_start(start, b) for b in bits], device=q.device)
        past_level = bit_length(torch.bitwise_xor(pos[:, None], roots[None, :]), levels)  # [C, S']
        past_weight = lam.gather(-1, past_level.expand(*lam.shape[:2], size, len(bits))) * gc.exp()[..., None]
        rows = (q[..., None, :] * past_weight[..., None]).flatten(-2)  # [B, H, C, S'·K]
        out = out + rows @ slots.index_select(2, index).flatten(2, 3)  # [B, H, S'·K, V]
    end = start + size
    moved: dict[int, Tensor] = {}
    total = gc[..., -1:].exp()  # [B, H, 1]
    for b in bits:
        target = (end ^ _bucket_start(start, b)).bit_length() - 1
        moved[target] = moved.get(target, 0) + slots[:, :, b] * total[..., None]
    weighted = k * (gc[..., -1:] - gc).exp()[..., None]  # k_j · exp(G_end − G_j)
    first = 0
    while first < size:  # tokens of one target slot form a contiguous run
        target = (end ^ (start + first)).bit_length() - 1
        last = first + 1
        while last < size and (end ^ (start + last)).bit_length() - 1 == target:
            last += 1
        kv = weighted[:, :, first:last].transpose(-1, -2) @ v[:, :, first:last]
        moved[target] = moved.get(target, 0) + kv
        first = last
    zero = torch.zeros_like(slots[:, :, 0])
    new = torch.stack([moved.get(b, zero) for b in range(slots.shape[2])], dim=2)
    return out, new


def chunk_log_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    lam: Tensor,
    start: int,
    slots: Tensor,
    chunk_size: int = 64,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-linear attention (module docstring) of a call whose first token sits at absolute position
    `start`, continuing from the bucket `slots` [B, H, S, K, V] of [0, start). Returns o [B, T, H, V] in
    q's dtype and the slots of [0, start + T) in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    heads = v.shape[2]

    def head_major(t: Tensor) -> Tensor:
        return t.to(dtype).transpose(1, 2)

    qh = head_major(expand_heads(q, heads, 2)) * scale
    kh = head_major(expand_heads(k, heads, 2))
    vh, gh, lh = head_major(v), head_major(g), head_major(lam)  # [B, H, T, ...]
    slots = slots.to(dtype)
    outputs, first = [], 0
    while first < q.shape[1]:
        position = start + first
        last = min(q.shape[1], first + chunk_size - position % chunk_size)  # the next chunk boundary
        out, slots = _piece(
            qh[:, :, first:last], kh[:, :, first:last], vh[:, :, first:last], gh[:, :, first:last],
            lh[:, :, first:last], slots, position,
        )  # fmt: skip
        outputs.append(out)
        first = last
    return torch.cat(outputs, dim=2).transpose(1, 2).to(q.dtype), slots


def log_linear_forward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, lam: Tensor, start: int, backend: str, chunk_size: int
) -> Tensor:
    """The mixin's path for a call of unpadded rows at the shared positions [start, start + T) with no
    state (training; scale 1, as Mamba2's SSD). `backend` is resolved already; the fused kernel (fla's
    `chunk_log_linear_attn`, whose state format is its own) needs `start` 0. Padded calls and decode
    states take `log_linear_rows.chunk_log_linear_rows` (each row its own positions)."""
    if backend == "fused" and start == 0:
        out, _ = fla_op(*FUSED_KERNEL)(
            q=q, k=k, v=v.to(q.dtype), g=g.float(), level_scales=lam.float(), scale=1.0
        )
        return out.to(v.dtype)
    batch, heads = v.shape[0], v.shape[2]
    count = lam.shape[-1] - 1
    empty = v.new_zeros(batch, heads, count, k.shape[-1], v.shape[-1], dtype=compute_dtype(v.dtype))
    return chunk_log_linear(q, k, v, g, lam, start, empty, chunk_size)[0]

"""Sub-chunked decayed scores for per-channel log-decays: the intra-chunk core of GLA, HGRN2, KDA and RWKV-7.

Inside a chunk of C tokens with log-decays g_t [K] (<= 0) and chunk-local cumulative B_t = Σ_{j<=t} g_j,
every chunked per-channel rule needs score matrices

    A[t, s] = Σ_c x_t[c] y_s[c] exp(R_t[c] − B_s[c])      for s <= t (s < t when strict), 0 elsewhere,

with R = B (inclusive rows: decay through t) or R_t = B_{t−1} (exclusive rows: decay up to t, DPLR's
low-rank term; always strict, since exp(B_{t−1} − B_t) = exp(−g_t) >= 1). Materialising the pairwise
[C, C, K] decay costs C·K per token in memory and time; this module does what fla's GLA/KDA kernels do
(secondary chunking). The chunk is split into sub-chunks of S tokens; for a row t in sub-chunk i let
r_i = B_{start_i − 1} (the cumulative decay just before sub-chunk i starts, 0 for the first). For every
column s before sub-chunk i,

    exp(R_t − B_s) = exp(R_t − r_i) · exp(r_i − B_s),   R_t <= r_i <= B_s,

so both factors have an exponent <= 0 (nothing overflows, however strong the decay), and the rows of
sub-chunk i against its i·S earlier columns are one matrix product of x decayed to r_i [S, K] with y
decayed from r_i [i·S, K]. Inside a diagonal sub-block the pairs t = s + d of one offset d share an
[S − d, K] decay exp(R_t − B_{t−d}), exponent <= 0 (d = 0 only for inclusive rows, where it is 1). No
masked entry is ever computed. Cost per token: about (C/S + S)/2 · K instead of C·K.

Backward. A depends on R and B only through R_t − B_s, so with dx, dy the gradients of A's inputs x, y,

    ∂L/∂R_t[c] = x_t[c] · dx_t[c],      ∂L/∂B_s[c] = −y_s[c] · dy_s[c],

and dx, dy are decayed products of the same sub-chunked form. `DecayedScores` computes them by hand
instead of letting autograd record every broadcast product, and one call serves several x (rows sharing
R) against several y, so a layer's score matrices share their decay factors. It saves only its inputs
(the layer keeps them anyway) and recomputes the decay factors in the backward: they are elementwise,
while keeping them cost about 180 MB per KDA layer at B=4, T=4096, memory that each training step must
fault in afresh. `scripts/bench_per_channel.py`
times it against the pairwise decay under autograd; tests/model/test_per_channel.py holds values and
gradients to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def sub_chunk_length(chunk_size: int, sub_chunk_size: int | None) -> int:
    """The sub-chunk length: as given, else the power of two nearest sqrt(chunk_size) (it minimises the
    S + C/S cost), never more than the chunk."""
    if sub_chunk_size is None:
        sub_chunk_size = 2 ** round(math.log2(max(chunk_size, 1)) / 2)
    return max(1, min(sub_chunk_size, chunk_size))


def per_channel_scores(
    xs: Sequence[Tensor],
    ys: Sequence[Tensor],
    rows: Tensor,
    cum: Tensor,
    sub_chunk_size: int,
    strict: bool = False,
) -> Tensor:
    """A[i, j][t, s] = Σ_c xs[i]_t[c] ys[j]_s[c] exp(rows_t[c] − cum_s[c]) for s <= t (s < t if strict),
    0 elsewhere. Every tensor is [..., C, K] or broadcasts to a common shape (a scalar decay per head:
    rows/cum [..., C, 1]); `cum` is the chunk-local cumulative log-decay B, `rows` is B itself or
    B_{t−1} = B − g (then `strict` must hold). C must be a multiple of `sub_chunk_size`.
    Returns [len(xs), len(ys), ..., C, C]."""
    inputs = (*xs, *ys, rows, cum)
    *lead, size, width = torch.broadcast_shapes(*(t.shape for t in inputs))
    if size % sub_chunk_size:
        raise ValueError(f"chunk of {size} tokens is not a multiple of sub_chunk_size={sub_chunk_size}")
    flat = [t.expand(*lead, size, width).reshape(-1, size, width) for t in inputs]
    out = DecayedScores.apply(sub_chunk_size, strict, len(xs), *flat)
    return out.view(len(xs), len(ys), *lead, size, size)


class DecayedScores(torch.autograd.Function):
    """`per_channel_scores` on flat inputs: X tensors x [L, C, K], Y tensors y [L, C, K], rows and cum
    [L, C, K] -> [X, Y, L, C, C], with the hand-written backward of the module docstring.

    Off the diagonal sub-blocks, row sub-chunk i meets only the i·S columns before it: the rows of all X
    inputs ([L, X·S, K], decayed to r_i) times the decayed columns of all Y inputs ([L, Y·i·S, K]), one
    batched matrix product per sub-chunk (n − 1 of them). Inside a diagonal sub-block, the pairs t = s + d
    of one offset d are a [L, n, S − d, K] decay, so no masked entry is ever computed. Only the inputs are
    saved: the backward recomputes the decay factors and the decayed rows and columns (elementwise), so a
    layer keeps no [L, C, K]-sized tensor of its own for the backward."""

    @staticmethod
    def forward(ctx: Any, sub: int, strict: bool, num_x: int, *inputs: Tensor) -> Tensor:
        decays = _SubChunkDecays(inputs[-2], inputs[-1], sub)
        xs, ys = inputs[:num_x], inputs[num_x:-2]
        length, size, _ = decays.cum.shape
        num_y, num_sub = len(ys), size // sub
        x_rows = decays.rows_to_reference(xs)
        scores = x_rows.new_zeros(length, num_sub, num_x, sub, num_y, size)
        for i in range(1, num_sub):
            start = i * sub
            cols = decays.columns_from_reference(ys, decays.column_factor(i))
            product = x_rows[:, i] @ cols.transpose(-1, -2)  # [L, X·S, Y·i·S]
            scores[:, i, :, :, :, :start] = product.view(length, num_x, sub, num_y, start)
        blocks = torch.diagonal(scores.view(*scores.shape[:-1], num_sub, sub), 0, 1, 5)  # [L, X, S, Y, S, n]
        for offset in range(1 if strict else 0, sub):
            decay = decays.pair_decay(offset)  # [L, n, S − d, K]
            for i, x in enumerate(xs):
                x_decayed = decays.blocks(x)[:, :, offset:] * decay
                for j, y in enumerate(ys):
                    pairs = (x_decayed * decays.blocks(y)[:, :, : sub - offset]).sum(-1)  # [L, n, S − d]
                    torch.diagonal(blocks[:, i, :, j], -offset, 1, 2).copy_(pairs)
        ctx.save_for_backward(*inputs)
        ctx.sub, ctx.strict, ctx.num_x = sub, strict, num_x
        return scores.permute(2, 4, 0, 1, 3, 5).reshape(num_x, num_y, length, size, size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        sub, strict, num_x = ctx.sub, ctx.strict, ctx.num_x
        inputs = ctx.saved_tensors
        decays = _SubChunkDecays(inputs[-2], inputs[-1], sub)
        xs, ys = inputs[:num_x], inputs[num_x:-2]
        length, size, width = decays.cum.shape
        num_y, num_sub = len(ys), size // sub
        x_rows = decays.rows_to_reference(xs)
        grad = grad.reshape(num_x, num_y, length, num_sub, sub, num_sub, sub).permute(2, 3, 0, 4, 1, 5, 6)
        dx_rows = x_rows.new_zeros(length, num_sub, num_x * sub, width)
        dy = x_rows.new_zeros(num_y, length, size, width)
        for i in range(1, num_sub):
            start = i * sub
            factor = decays.column_factor(i)
            cols = decays.columns_from_reference(ys, factor)
            grad_i = grad[:, i, :, :, :, :i].reshape(length, num_x * sub, num_y * start)
            dx_rows[:, i] = grad_i @ cols
            dy_cols = (grad_i.transpose(-1, -2) @ x_rows[:, i]).view(length, num_y, start, width)
            dy[:, :, :start] += (dy_cols * factor[:, None]).transpose(0, 1)
        dx_blocks = dx_rows.view(length, num_sub, num_x, sub, width) * decays.row_factor[:, :, None]
        dy_blocks = dy.view(num_y, length, num_sub, sub, width)
        blocks = torch.diagonal(grad, 0, 1, 5)  # [L, X, S, Y, S, n]
        for offset in range(1 if strict else 0, sub):
            decay = decays.pair_decay(offset)
            for i, x in enumerate(xs):
                x_decayed = decays.blocks(x)[:, :, offset:] * decay  # [L, n, S − d, K]
                for j, y in enumerate(ys):
                    # the gradient of the pairs t = s + d: [L, n, S − d, 1]
                    pair_grad = torch.diagonal(blocks[:, i, :, j], -offset, 1, 2).unsqueeze(-1)
                    y_decayed = decays.blocks(y)[:, :, : sub - offset] * decay
                    dx_blocks[:, :, i, offset:] += pair_grad * y_decayed
                    dy_blocks[j, :, :, : sub - offset] += pair_grad * x_decayed
        dx = dx_blocks.permute(2, 0, 1, 3, 4).reshape(num_x, length, size, width)
        d_rows = sum(x * dx_i for x, dx_i in zip(xs, dx, strict=True))
        d_cum = -sum(y * dy_j for y, dy_j in zip(ys, dy, strict=True))
        return None, None, None, *dx, *dy, d_rows, d_cum


class _SubChunkDecays:
    """The decay factors of one chunk split into sub-chunks of S: rows/cum [L, C, K], n = C / S."""

    def __init__(self, rows: Tensor, cum: Tensor, sub: int) -> None:
        length, size, width = cum.shape
        self.sub, self.num_sub, self.cum = sub, size // sub, cum
        self.cum_blocks = self.blocks(cum)
        self.row_blocks = self.blocks(rows)
        # r_i = B just before sub-chunk i starts (0 for the first): [L, n, K]
        self.reference = torch.cat([cum.new_zeros(length, 1, width), self.cum_blocks[:, :-1, -1]], dim=1)
        self.row_factor = (self.row_blocks - self.reference[:, :, None]).exp_()  # exp(R_t − r_i) [L, n, S, K]

    def blocks(self, t: Tensor) -> Tensor:
        """[L, C, K] -> [L, n, S, K] (a view)."""
        return t.view(t.shape[0], self.num_sub, self.sub, t.shape[-1])

    def rows_to_reference(self, xs: Sequence[Tensor]) -> Tensor:
        """Every x decayed to its sub-chunk's r_i, x_t ⊙ exp(R_t − r_i): [L, n, X·S, K]."""
        length, num_sub, sub, width = self.row_factor.shape
        x_rows = self.row_factor.new_empty(length, num_sub, len(xs), sub, width)
        for i, x in enumerate(xs):
            x_rows[:, :, i].copy_(self.blocks(x)).mul_(self.row_factor)
        return x_rows.view(length, num_sub, len(xs) * sub, width)

    def column_factor(self, i: int) -> Tensor:
        """exp(r_i − B_s) for the columns s before sub-chunk i: [L, i·S, K]."""
        return (self.reference[:, i, None] - self.cum[:, : i * self.sub]).exp_()

    def columns_from_reference(self, ys: Sequence[Tensor], factor: Tensor) -> Tensor:
        """Every y's columns before sub-chunk i decayed from r_i, y_s ⊙ exp(r_i − B_s), given that
        `column_factor(i)` [L, i·S, K]: [L, Y·i·S, K]."""
        cols = factor.new_empty(factor.shape[0], len(ys), *factor.shape[1:])
        for j, y in enumerate(ys):
            cols[:, j].copy_(y[:, : factor.shape[1]]).mul_(factor)
        return cols.view(factor.shape[0], -1, factor.shape[-1])

    def pair_decay(self, offset: int) -> Tensor:
        """exp(R_t − B_{t−d}) for the pairs t = s + d inside each sub-chunk: [L, n, S − d, K]."""
        return (self.row_blocks[:, :, offset:] - self.cum_blocks[:, :, : self.sub - offset]).exp_()

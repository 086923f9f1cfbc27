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
R) against several y, so a layer's score matrices share their decay factors. `scripts/bench_per_channel.py`
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
    x_stack, y_stack = torch.stack(flat[: len(xs)]), torch.stack(flat[len(xs) : -2])
    out = DecayedScores.apply(x_stack, y_stack, flat[-2], flat[-1], sub_chunk_size, strict)
    return out.view(len(xs), len(ys), *lead, size, size)


class DecayedScores(torch.autograd.Function):
    """`per_channel_scores` on flat inputs: xs [X, L, C, K], ys [Y, L, C, K], rows/cum [L, C, K] ->
    [X, Y, L, C, C], with the hand-written backward of the module docstring.

    Off the diagonal sub-blocks, row sub-chunk i meets only the i·S columns before it: the rows of all X
    inputs ([L, X·S, K], decayed to r_i) times the decayed columns of all Y inputs ([L, Y·i·S, K]), one
    batched matrix product per sub-chunk (n − 1 of them). Inside a diagonal sub-block, the pairs t = s + d
    of one offset d are a [L, n, S − d, K] decay, so no masked entry is ever computed."""

    @staticmethod
    def forward(
        ctx: Any, xs: Tensor, ys: Tensor, rows: Tensor, cum: Tensor, sub: int, strict: bool
    ) -> Tensor:
        num_x, length, size, width = xs.shape
        num_y, num_sub = ys.shape[0], size // sub
        cum_blocks = cum.reshape(length, num_sub, sub, width)
        row_blocks = rows.reshape(length, num_sub, sub, width)
        ref = torch.cat([cum.new_zeros(length, 1, width), cum_blocks[:, :-1, -1]], dim=1)  # r_i: [L, n, K]
        row_factor = (row_blocks - ref[:, :, None]).exp_()  # exp(R_t − r_i): [L, n, S, K]
        x_blocks = xs.view(num_x, length, num_sub, sub, width).permute(1, 2, 0, 3, 4)  # [L, n, X, S, K]
        y_blocks = ys.view(num_y, length, num_sub, sub, width).permute(1, 2, 0, 3, 4)  # [L, n, Y, S, K]
        x_rows = (x_blocks * row_factor[:, :, None]).reshape(length, num_sub, num_x * sub, width)
        scores = xs.new_zeros(length, num_sub, num_x, sub, num_y, size)
        col_factors, y_cols = [], []
        for i in range(1, num_sub):
            start = i * sub
            col = (ref[:, i, None] - cum[:, :start]).exp_()  # exp(r_i − B_s), s < start_i: [L, i·S, K]
            cols = (ys[:, :, :start].transpose(0, 1) * col[:, None]).reshape(length, num_y * start, width)
            product = (x_rows[:, i] @ cols.transpose(-1, -2)).view(length, num_x, sub, num_y, start)
            scores[:, i, :, :, :, :start] = product
            col_factors.append(col)
            y_cols.append(cols)
        blocks = torch.diagonal(scores.view(*scores.shape[:-1], num_sub, sub), 0, 1, 5)  # [L, X, S, Y, S, n]
        pair_decays = []
        for offset in range(1 if strict else 0, sub):
            decay = (row_blocks[:, :, offset:] - cum_blocks[:, :, : sub - offset]).exp_()  # [L, n, S − d, K]
            x_decayed = x_blocks[:, :, :, offset:] * decay[:, :, None]  # [L, n, X, S − d, K]
            pairs = (x_decayed[:, :, :, None] * y_blocks[:, :, None, :, : sub - offset]).sum(-1)
            torch.diagonal(blocks, -offset, 2, 4).copy_(pairs.permute(0, 2, 3, 1, 4))  # [L, X, Y, n, S − d]
            pair_decays.append(decay)
        ctx.save_for_backward(xs, ys, row_factor, x_rows, *col_factors, *y_cols, *pair_decays)
        ctx.sub, ctx.strict = sub, strict
        return scores.permute(2, 4, 0, 1, 3, 5).reshape(num_x, num_y, length, size, size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        sub, strict = ctx.sub, ctx.strict
        xs, ys, row_factor, x_rows, *rest = ctx.saved_tensors
        num_x, length, size, width = xs.shape
        num_y, num_sub = ys.shape[0], size // sub
        col_factors, y_cols, pair_decays = (
            rest[: num_sub - 1],
            rest[num_sub - 1 : 2 * num_sub - 2],
            rest[2 * num_sub - 2 :],
        )
        grad = grad.reshape(num_x, num_y, length, num_sub, sub, num_sub, sub).permute(2, 3, 0, 4, 1, 5, 6)
        dx_rows = xs.new_zeros(length, num_sub, num_x * sub, width)
        dy = ys.new_zeros(num_y, length, size, width)
        for i in range(1, num_sub):
            start = i * sub
            grad_i = grad[:, i, :, :, :, :i].reshape(length, num_x * sub, num_y * start)
            dx_rows[:, i] = grad_i @ y_cols[i - 1]
            dy_cols = (grad_i.transpose(-1, -2) @ x_rows[:, i]).view(length, num_y, start, width)
            dy[:, :, :start] += (dy_cols * col_factors[i - 1][:, None]).transpose(0, 1)
        dx_blocks = (
            dx_rows.view(length, num_sub, num_x, sub, width) * row_factor[:, :, None]
        )  # [L, n, X, S, K]
        dy_blocks = dy.view(num_y, length, num_sub, sub, width).permute(1, 2, 0, 3, 4)  # [L, n, Y, S, K]
        x_blocks = xs.view(num_x, length, num_sub, sub, width).permute(1, 2, 0, 3, 4)
        y_blocks = ys.view(num_y, length, num_sub, sub, width).permute(1, 2, 0, 3, 4)
        blocks = torch.diagonal(grad, 0, 1, 5)  # [L, X, S, Y, S, n]
        for offset, decay in zip(range(1 if strict else 0, sub), pair_decays, strict=True):
            pair_grad = torch.diagonal(blocks, -offset, 2, 4).permute(0, 3, 1, 2, 4)[
                ..., None
            ]  # [L, n, X, Y, S − d, 1]
            y_decayed = y_blocks[:, :, :, : sub - offset] * decay[:, :, None]  # [L, n, Y, S − d, K]
            x_decayed = x_blocks[:, :, :, offset:] * decay[:, :, None]  # [L, n, X, S − d, K]
            dx_blocks[:, :, :, offset:] += (pair_grad * y_decayed[:, :, None]).sum(3)
            dy_blocks[:, :, :, : sub - offset] += (pair_grad * x_decayed[:, :, :, None]).sum(2)
        dx = dx_blocks.permute(2, 0, 1, 3, 4).reshape(num_x, length, size, width)
        return dx, dy, (xs * dx).sum(0), -(ys * dy).sum(0), None, None

"""Sub-chunked decayed scores for per-channel log-decays: the intra-chunk core of GLA, HGRN2, KDA and RWKV-7.

Inside a chunk of C tokens with log-decays g_t [K] (<= 0) and chunk-local cumulative B_t = Σ_{j<=t} g_j,
every chunked per-channel rule needs score matrices

    A[t, s] = Σ_c x_t[c] y_s[c] exp(R_t[c] − B_s[c])      for s <= t (s < t when strict), 0 elsewhere,

with R = B (inclusive rows: decay through t) or R_t = B_{t−1} (exclusive rows: decay up to t, DPLR's
low-rank term). Materialising the pairwise [C, C, K] decay costs C·K per token in memory and time; this
module does what fla's GLA/KDA kernels do (secondary chunking). The chunk is split into sub-chunks of S
tokens; for a row t in sub-chunk i and a column s in an earlier sub-chunk j < i, let r_i = B_{start_i − 1}
(the cumulative decay just before sub-chunk i starts). Then

    exp(R_t − B_s) = exp(R_t − r_i) · exp(r_i − B_s),   R_t <= r_i <= B_s,

so both factors have an exponent <= 0 (nothing overflows, however strong the decay) and the off-diagonal
sub-blocks are one batched matrix product of x decayed to r_i with y decayed from r_i. Only the diagonal
sub-blocks keep a pairwise [S, S, K] decay (masked before the exp). Cost per token: (S + C/S)·K instead
of C·K, so a chunk of 64 with sub-chunks of 8 costs what a plain chunk of 16 did, with 4x fewer chunk
steps in the state carry. Layout: [..., C, K] (any leading dims; C a multiple of S).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sub_chunk_length(chunk_size: int, sub_chunk_size: int | None) -> int:
    """The sub-chunk length: as given, else the power of two nearest sqrt(chunk_size) (it minimises the
    S + C/S cost), never more than the chunk."""
    if sub_chunk_size is None:
        sub_chunk_size = 2 ** round(math.log2(max(chunk_size, 1)) / 2)
    return max(1, min(sub_chunk_size, chunk_size))


class SubChunkDecay:
    """The decay factors of one chunking ([..., C, K] log-decays), shared by every score matrix built on
    it: row factors exp(R_t − r_i) [..., C, K], column factors exp(r_i − B_s) [..., n, C, K] (zero unless s
    lies before sub-chunk i) and the diagonal sub-blocks' pairwise decay [..., n, S, S, K]. Each is built on
    first use and kept for the next score matrix."""

    def __init__(self, g: Tensor, sub_chunk_size: int) -> None:
        size = g.shape[-2]
        if size % sub_chunk_size:
            raise ValueError(f"chunk of {size} tokens is not a multiple of sub_chunk_size={sub_chunk_size}")
        self.sub, self.num_sub = sub_chunk_size, size // sub_chunk_size
        self.cum = g.cumsum(-2)  # B_t, non-increasing down the chunk
        self.before = self.cum - g  # B_{t−1} (0 at the chunk start)
        self._ref = self.before[..., :: self.sub, :]  # r_i: [..., n, K]
        self._cache: dict[tuple[str, bool], Tensor] = {}

    def _blocks(self, x: Tensor) -> Tensor:
        """[..., C, W] -> [..., n, S, W]."""
        return x.unflatten(-2, (self.num_sub, self.sub))

    def _rows(self, exclusive: bool) -> Tensor:
        return self.before if exclusive else self.cum

    def _row_factor(self, exclusive: bool) -> Tensor:
        """exp(R_t − r_i) for t in sub-chunk i: [..., n, S, K], exponent <= 0."""
        key = ("row", exclusive)
        if key not in self._cache:
            self._cache[key] = (self._blocks(self._rows(exclusive)) - self._ref[..., None, :]).exp()
        return self._cache[key]

    def _col_factor(self) -> tuple[Tensor, Tensor]:
        """exp(e_j − B_s) for s in sub-chunk j, e_j = B at its last token: [..., n, S, K]; and the decay
        between sub-chunks, exp(r_i − e_j) for j < i (0 otherwise): [..., n, n, K]. Exponents <= 0."""
        key = ("col", False)
        if key not in self._cache:
            cum = self._blocks(self.cum)
            ends = cum[..., -1, :]  # e_j: [..., n, K]
            earlier = torch.ones(self.num_sub, self.num_sub, dtype=torch.bool, device=cum.device).tril(-1)
            middle = self._ref[..., :, None, :] - ends[..., None, :, :]  # r_i − e_j: [..., n, n, K]
            middle = middle.masked_fill(~earlier[..., None], float("-inf")).exp()
            self._cache[key] = (ends[..., None, :] - cum).exp()
            self._cache[("middle", False)] = middle
        return self._cache[key], self._cache[("middle", False)]

    def _diag_decay(self, exclusive: bool, strict: bool) -> Tensor:
        """exp(R_t − B_s) for s <= t (s < t if strict) inside one sub-chunk: [..., n, S, S, K]."""
        key = (f"diag{int(exclusive)}", strict)
        if key not in self._cache:
            keep = torch.ones(self.sub, self.sub, dtype=torch.bool, device=self.cum.device)
            keep = keep.tril(-1 if strict else 0)
            rows, cols = self._blocks(self._rows(exclusive)), self._blocks(self.cum)
            diff = rows[..., :, None, :] - cols[..., None, :, :]
            self._cache[key] = diff.masked_fill(~keep[..., None], float("-inf")).exp()
        return self._cache[key]

    def scores(self, x: Tensor, y: Tensor, exclusive: bool = False, strict: bool = False) -> Tensor:
        """A[t, s] = Σ_c x_t[c] y_s[c] exp(R_t[c] − B_s[c]) for s <= t (s < t if strict), 0 elsewhere.
        x/y [..., C, K] (leading dims broadcast against the decays) -> [..., C, C]. R = B_{t−1} when
        `exclusive`, else B_t."""
        col, middle = self._col_factor()
        xb = self._blocks(x) * self._row_factor(exclusive)  # [..., n, S, K]
        yb = self._blocks(y) * col  # [..., n, S, K]
        off = (xb[..., :, None, :, :] * middle[..., None, :]) @ yb[..., None, :, :, :].transpose(-1, -2)
        pairs = self._blocks(x)[..., :, None, :] * self._blocks(y)[..., None, :, :]  # [..., n, S, S, K]
        diag = (pairs * self._diag_decay(exclusive, strict)).sum(-1)  # [..., n, S, S]
        eye = torch.eye(self.num_sub, dtype=diag.dtype, device=diag.device)[:, :, None, None]  # [n, n, 1, 1]
        full = off + eye * diag[..., :, None, :, :]  # [..., n_t, n_s, S_t, S_s]
        return full.transpose(-3, -2).flatten(-4, -3).flatten(-2)

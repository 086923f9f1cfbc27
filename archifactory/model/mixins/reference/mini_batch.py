"""Mini-batch alignment for test-time-training layers (TTT, Titans), whose mini-batches are part of the math.

Their inner model takes one gradient step per mini-batch of `chunk` consecutive tokens of a stream, so a
token's slot within its mini-batch must not depend on how a call cut the stream: a left-padded row, a
prefill that stopped mid-mini-batch, a decode step. `MiniBatchLayout` moves each row's real tokens onto a
grid where the row's i-th real token of this call sits at column `phase + i` (`phase`: the tokens of the
current mini-batch the state already holds), so every mini-batch of the grid is one of the stream's;
pads and the `phase` leading slots become empty slots (zeros, `real` False). Outputs come back to their
places, pads read zeros. Index arithmetic only: no host sync, the grid length is a Python int.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MiniBatchLayout:
    """Where each token [B, T] of a call sits on the aligned grid [B, L] (L a whole number of chunks)."""

    dest: Tensor  # [B, T] long: the grid column of each real token; L (a dropped column) for pads
    real: Tensor  # [B, L] bool: grid columns holding a real token
    length: int  # L

    @classmethod
    def build(cls, mask: Tensor | None, phase: Tensor, seq_len: int, chunk: int) -> MiniBatchLayout:
        """`mask` [B, T] (True = real; None = all real), `phase` [B] long in [0, chunk)."""
        if mask is None:
            mask = torch.ones(phase.shape[0], seq_len, dtype=torch.bool, device=phase.device)
        length = -(-(seq_len + chunk - 1) // chunk) * chunk
        dest = torch.where(mask, phase[:, None] + mask.long().cumsum(1) - 1, length)
        real = torch.zeros(mask.shape[0], length + 1, dtype=torch.bool, device=mask.device)
        real = real.scatter(1, dest, mask)[:, :length]
        return cls(dest, real, length)

    def to_grid(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> [B, L, ...], empty slots 0 (a pad's gradient is exactly 0)."""
        index = self.dest.view(*self.dest.shape, *([1] * (x.dim() - 2))).expand_as(x)
        grid = x.new_zeros(x.shape[0], self.length + 1, *x.shape[2:])
        return grid.scatter(1, index, x)[:, : self.length]

    def from_grid(self, y: Tensor) -> Tensor:
        """y [B, L, ...] -> [B, T, ...] at each token's place (pads get zeros)."""
        y = torch.cat([y, y.new_zeros(y.shape[0], 1, *y.shape[2:])], dim=1)
        index = self.dest.view(*self.dest.shape, *([1] * (y.dim() - 2))).expand(-1, -1, *y.shape[2:])
        return y.gather(1, index)

"""The training loader: packed fixed-length windows in a seeded order, checkpointable, rank-sliced.

The training split is one token stream (documents joined by EOS). Window i holds tokens
[i·T, i·T + T + 1): inputs are its first T tokens, targets its last T, so every token is a target
exactly once per epoch. Epoch e visits the windows in the permutation drawn from
`numpy.random.default_rng([seed, e])`, and the epochs follow one another as one endless order: each
batch takes the next `world_size × batch_size` windows of it and rank r keeps the r-th `batch_size` of
them (disjoint across ranks). A batch at the end of an epoch takes its last windows and runs on into the
next epoch's first ones, so no window is skipped and the order depends on nothing but the seed: every
world size and gradient accumulation that make the same global batch read the same windows at every
optimizer step, across epoch ends too (a resume under another world size stays exact). The position is
two integers (epoch, windows of it consumed), so a resumed run continues with the next unseen batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.shards import TokenStream

Batch = tuple[torch.Tensor, torch.Tensor]


def _fill(
    stream: TokenStream, windows: np.ndarray, seq_len: int, inputs: np.ndarray, targets: np.ndarray
) -> None:
    """Copy windows (starting at window index × seq_len) into `inputs`/`targets` [B, seq_len]."""
    starts = windows.astype(np.int64) * seq_len
    if len(stream.arrays) == 1:
        rows = stream.arrays[0][starts[:, None] + np.arange(seq_len + 1)]  # [B, T+1], one gather
        inputs[:] = rows[:, :-1]
        targets[:] = rows[:, 1:]
        return
    for row, start in enumerate(starts):
        window = stream.read(int(start), seq_len + 1)
        inputs[row] = window[:-1]
        targets[row] = window[1:]


def _empty(shape: tuple[int, int], pin_memory: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory)


class PackedLoader:
    """Infinite iterator of `(inputs, targets)` int64 tensors [batch_size, seq_len] for one rank."""

    def __init__(
        self, stream: TokenStream, seq_len: int, batch_size: int, seed: int,
        rank: int = 0, world_size: int = 1, pin_memory: bool = False,
    ) -> None:  # fmt: skip
        if batch_size < 1 or seq_len < 1:
            raise ArchiFactoryError(f"batch size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if not 0 <= rank < world_size:
            raise ArchiFactoryError(f"rank {rank} is outside world size {world_size}")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # Pinned pages let `.to("cuda", non_blocking=True)` overlap the copy; without CUDA there is nothing
        # to pin for (and torch refuses to pin).
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.num_windows = max(stream.total - 1, 0) // seq_len
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise ArchiFactoryError(
                f"the training split has {stream.total:,} tokens: fewer than one batch of "
                f"{self.global_batch} x {seq_len + 1}; lower trainer.seq_len or trainer.micro_batch_size, "
                "or add data"
            )
        self.batches_per_epoch = self.num_windows // self.global_batch
        self.epoch = 0
        self.position = 0  # windows of this epoch's permutation already handed out (all ranks)
        self._orders: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # keep this epoch's order and the next one's only
            self._orders = {e: order for e, order in self._orders.items() if e >= self.epoch}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._orders[epoch]

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Windows `first … first + count - 1` of this epoch's order, running on into the next epoch's
        (a global batch is at most one epoch, so at most two epochs are involved)."""
        here = self._permutation(self.epoch)[first : first + count]
        if len(here) == count:
            return here
        start = max(first - self.num_windows, 0)
        later = self._permutation(self.epoch + 1)[start : start + count - len(here)]
        return np.concatenate([here, later])

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        windows = self._windows(self.position + self.rank * self.batch_size, self.batch_size)
        self.position += self.global_batch
        if self.position >= self.num_windows:  # this epoch is used up: the batch ran into the next one
            self.epoch += 1
            self.position -= self.num_windows
        shape = (self.batch_size, self.seq_len)
        inputs, targets = _empty(shape, self.pin_memory), _empty(shape, self.pin_memory)
        _fill(self.stream, windows, self.seq_len, inputs.numpy(), targets.numpy())
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (JSON-able)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "tokens": self.stream.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: same data and seed; batch size and world size may differ."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "num_windows", "tokens"):
            if state.get(key) != mine[key]:
                raise ArchiFactoryError(
                    f"the checkpoint's data position is for {key}={state.get(key)}, "
                    f"this run has {mine[key]}; "
                    "resume with the same dataset, seed and trainer.seq_len"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def val_batches(stream: TokenStream, seq_len: int, batch_size: int, max_tokens: int) -> list[Batch]:
    """The first `max_tokens` of the validation stream as consecutive windows, in fixed batches."""
    available = max(stream.total - 1, 0) // seq_len
    count = min(max_tokens // seq_len, available)
    if count < 1:
        raise ArchiFactoryError(
            f"the validation split has {stream.total:,} tokens, fewer than one window of {seq_len + 1} "
            f"(or eval tokens {max_tokens} < seq_len); lower trainer.seq_len or raise dataset.val_fraction"
        )
    batches = []
    for first in range(0, count, batch_size):
        windows = np.arange(first, min(first + batch_size, count))
        inputs = torch.empty((len(windows), seq_len), dtype=torch.int64)
        targets = torch.empty_like(inputs)
        _fill(stream, windows, seq_len, inputs.numpy(), targets.numpy())
        batches.append((inputs, targets))
    return batches

"""Next-token cross-entropy from final hidden states, optionally in chunks.

With a large vocabulary the fp32 logits of a whole batch ([B·T, V]) dominate memory. The chunked path
computes logits for `chunk_size` tokens at a time under activation checkpointing, so the backward
recomputes each chunk's logits instead of keeping them: peak memory is one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ weight.t()).float()  # [N, V]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def logits_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (in fp32) from logits the caller already has. logits [N, V], targets [N]."""
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / count


def lm_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 0) -> Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX. hidden [N, D], weight [V, D], targets [N]."""
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_loss_sum(hidden, weight, targets) / count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss_sum, hidden[start:end], weight, targets[start:end], use_reentrant=False
        )
    return total / count

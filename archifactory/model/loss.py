"""Next-token cross-entropy from final hidden states, optionally in chunks.

With a large vocabulary the fp32 logits of a whole batch ([B·T, V]) dominate memory. The chunked path
computes logits for `chunk_size` tokens at a time under activation checkpointing, so the backward
recomputes each chunk's logits instead of keeping them: peak memory is one chunk's logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _CrossEntropySum(torch.autograd.Function):
    """Σ over targets != IGNORE_INDEX of −log softmax(logits)[target]; logits [N, V], targets [N].

    The value and gradient of `F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
    reduction="sum")` (the reference `tests/model/test_loss.py` holds it to), cheaper in eager mode: the
    backward turns the log-probabilities its forward saved into the gradient *in place*,
    g · (softmax − onehot(target)), where torch's nll_loss + log_softmax backward fills an [N, V] zero
    gradient, scatters into it and writes a third [N, V] buffer. On CPU that halves the time of the loss
    beyond its matmul and saves two [N, V] allocations. A second backward through the same graph
    (`retain_graph=True`) is refused by autograd's check of the saved tensor's version.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # noqa: ANN001
        log_probs = torch.log_softmax(logits, dim=-1)
        valid = targets != IGNORE_INDEX
        picked = torch.where(valid, targets, 0).unsqueeze(-1)  # [N, 1]; ignored rows read class 0, weight 0
        ctx.save_for_backward(log_probs, picked, valid)
        return -(log_probs.gather(-1, picked).squeeze(-1) * valid).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        log_probs, picked, valid = ctx.saved_tensors
        scale = (grad * valid).unsqueeze(-1).to(log_probs.dtype)  # [N, 1]: 0 on ignored rows
        grad_logits = log_probs.exp_().mul_(scale)  # softmax · g, in the saved buffer
        return grad_logits.scatter_add_(-1, picked, -scale), None


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy in fp32 over targets != IGNORE_INDEX. logits [N, V] (any float dtype)."""
    return _CrossEntropySum.apply(logits.float(), targets)


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return cross_entropy_sum(hidden @ weight.t(), targets)  # logits [N, V]


def logits_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (in fp32) from logits the caller already has. logits [N, V], targets [N]."""
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return cross_entropy_sum(logits, targets) / count


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

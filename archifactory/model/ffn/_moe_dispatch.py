"""Dropless token dispatch for routed FFNs: sort the (token, expert) assignments by expert, run one grouped
matmul per weight over the contiguous per-expert segments, scatter-add the weighted results back.

Three interchangeable ways to run the per-expert matmuls, held to each other by the tests:
- `grouped`: `torch._grouped_mm` — one kernel for all experts, no host sync. Works on CPU in fp32/bf16/fp16
  (not fp64) and on CUDA in bf16 with 16-byte-aligned widths (the check in `grouped_mm_supported`).
- `batched`: pad every expert's segment to the largest one and `bmm` — any dtype, one host sync.
- `loop`: a Python loop over experts — the readable reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DISPATCH_MODES = ("auto", "grouped", "batched", "loop")


@dataclass
class Dispatch:
    """Assignments sorted by expert; row i of the sorted buffer is token `token_idx[i]`."""

    token_idx: Tensor  # [M] token of each kept assignment, grouped by expert
    expert_idx: Tensor  # [M] its expert (non-decreasing)
    weights: Tensor  # [M] its combine weight
    counts: Tensor  # [E] kept assignments per expert (segment lengths)
    dropped: Tensor  # scalar, assignments dropped by the capacity limit (0 when dropless)


def expert_capacity(
    capacity_factor: float | None, num_tokens: int, top_k: int, num_experts: int
) -> int | None:
    """Switch's capacity: factor × the assignments an expert would get under uniform routing."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def sort_by_expert(indices: Tensor, weights: Tensor, num_experts: int, capacity: int | None) -> Dispatch:
    """indices, weights [N, k] -> Dispatch. Flattened choice-major (every token's first choice before any
    second choice) and stably sorted, so a full expert drops second choices first, then later tokens."""
    n, k = indices.shape
    flat_expert = indices.t().reshape(-1)  # [k*N], choice-major
    flat_token = torch.arange(n, device=indices.device).repeat(k)
    flat_weight = weights.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    dropped = torch.zeros((), dtype=torch.long, device=indices.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n * k, device=indices.device) - starts[flat_expert[order]]
        order = order[rank < capacity]
        kept = counts.clamp(max=capacity)
        dropped = counts.sum() - kept.sum()
        counts = kept
    return Dispatch(flat_token[order], flat_expert[order], flat_weight[order], counts, dropped)


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or torch.compiler.is_compiling():
        return False
    dtypes = (torch.bfloat16,) if x.device.type == "cuda" else (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in dtypes or weight.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[-1] % align == 0


def resolve_mode(mode: str, x: Tensor, weight: Tensor) -> str:
    if mode == "auto":
        return "grouped" if grouped_mm_supported(x, weight) else "batched"
    return mode


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward rejects
    expanded gradients (e.g. the one `y.sum()` produces)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad.contiguous()


def expert_matmul(x: Tensor, weight: Tensor, counts: Tensor, mode: str) -> Tensor:
    """Segment-wise x @ weight[e]: x [M, K] sorted by expert, weight [E, K, N], counts [E] -> [M, N]."""
    mode = resolve_mode(mode, x, weight)
    if mode == "grouped":
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight, offs=offsets))
    if mode == "batched":
        num_experts = weight.shape[0]
        expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)  # [M]
        row_in_expert = (
            torch.arange(x.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[expert_of_row]
        )
        padded = x.new_zeros(num_experts, int(counts.max()), x.shape[-1])  # [E, C, K]; sync
        padded = padded.index_put((expert_of_row, row_in_expert), x)
        return torch.bmm(padded, weight)[expert_of_row, row_in_expert]
    if mode == "loop":
        segments = x.split(counts.tolist())  # sync
        return torch.cat([segment @ weight[e] for e, segment in enumerate(segments)])
    raise ValueError(f"unknown dispatch mode {mode!r}")


def combine(out: Tensor, dispatch: Dispatch, num_tokens: int) -> Tensor:
    """Weighted scatter-add of the expert outputs [M, D] back to [N, D]; dropped assignments add nothing."""
    weighted = out * dispatch.weights.unsqueeze(-1).to(out.dtype)
    return out.new_zeros(num_tokens, out.shape[-1]).index_add(0, dispatch.token_idx, weighted)

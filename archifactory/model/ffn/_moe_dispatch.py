"""Token dispatch for routed FFNs, in one of two layouts, held to each other by the tests.

Sorted (dropless unless a capacity is set): sort the (token, expert) assignments by expert and run one
grouped matmul per weight over the contiguous per-expert segments. Three interchangeable ways to run them:
- `grouped`: `torch._grouped_mm` — one kernel for all experts, no host sync. Works on CPU in fp32/bf16/fp16
  (not fp64) and on CUDA in bf16 with 16-byte-aligned widths; under torch.compile in bf16 only (the shape
  check it is traced with takes bf16 only). See `grouped_mm_supported`.
- `batched`: pad every expert's segment to the largest one and `bmm` — any dtype, one host sync.
- `loop`: a Python loop over experts — the readable reference.

Slots (`capacity`): a fixed [E, C] grid, C = ceil(capacity_factor · tokens · k / E) (tokens when the factor
is null: nothing can drop). A token's slot in its expert's row is the running count of that expert's
assignments (a cumsum over the one-hot routing, first choices before second choices, then token order, as
the sorted path drops); assignments past C are dropped. Every shape is static, so torch.compile traces it
whole in any dtype; the price is E · C rows of expert work instead of the tokens · k actually routed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DISPATCH_MODES = ("auto", "grouped", "batched", "loop", "capacity")


@dataclass
class Dispatch:
    """Where each kept assignment is computed. Sorted: rows grouped by expert, fields [M]. Slots: fields
    [E, C] (expert_idx [E, 1]); an empty slot reads token 0 with weight 0, so it adds nothing."""

    token_idx: Tensor  # token of each row / slot
    expert_idx: Tensor  # its expert (sorted: non-decreasing)
    weights: Tensor  # its combine weight
    counts: Tensor  # [E] kept assignments per expert
    dropped: Tensor  # scalar, assignments dropped by the capacity limit (0 when dropless)
    slots: bool = False  # the static [E, C] layout

    def matmul(self, x: Tensor, weight: Tensor, mode: str) -> Tensor:
        """Per-expert x @ weight[e], weight [E, K, N]: x [M, K] -> [M, N] (sorted), [E, C, K] -> [E, C, N]."""
        if self.slots:
            return torch.bmm(x, weight)
        return expert_matmul(x, weight, self.counts, mode)


def expert_capacity(
    capacity_factor: float | None, num_tokens: int, top_k: int, num_experts: int
) -> int | None:
    """Switch's capacity: factor × the assignments an expert would get under uniform routing."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_one_hot(flat_expert: Tensor, num_experts: int) -> Tensor:
    """[M] expert ids -> [M, E] bool. Static in shape, unlike `bincount` (whose output length depends on the
    data: a graph break under torch.compile) or `F.one_hot` (which checks its input on the host)."""
    return flat_expert.unsqueeze(-1) == torch.arange(num_experts, device=flat_expert.device)


def count_per_expert(indices: Tensor, num_experts: int) -> Tensor:
    """[N, k] expert ids -> [E] int64 assignments per expert."""
    return expert_one_hot(indices.flatten(), num_experts).sum(0)


def _choice_major(indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten [N, k] choice-major (every token's first choice before any second choice): expert, token,
    weight of each assignment, [k·N] each. This order decides who is dropped when an expert is full."""
    n, k = indices.shape
    token = torch.arange(n, device=indices.device).repeat(k)
    return indices.t().reshape(-1), token, weights.t().reshape(-1)


def sort_by_expert(
    indices: Tensor, weights: Tensor, num_experts: int, capacity: int | None, counts: Tensor | None = None
) -> Dispatch:
    """indices, weights [N, k] -> sorted Dispatch (stable, choice-major: a full expert drops second choices
    first, then later tokens). `counts` [E]: the router's assignments per expert, if already counted.
    Dropless, every shape is static (M = N·k); a capacity makes M data-dependent."""
    flat_expert, flat_token, flat_weight = _choice_major(indices, weights)
    order = torch.argsort(flat_expert, stable=True)
    if counts is None:
        counts = count_per_expert(indices, num_experts)
    dropped = torch.zeros((), dtype=torch.long, device=indices.device)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat_expert.numel(), device=indices.device) - starts[flat_expert[order]]
        order = order[rank < capacity]
        kept = counts.clamp(max=capacity)
        dropped = counts.sum() - kept.sum()
        counts = kept
    return Dispatch(flat_token[order], flat_expert[order], flat_weight[order], counts, dropped)


def slot_dispatch(indices: Tensor, weights: Tensor, num_experts: int, capacity: int) -> Dispatch:
    """indices, weights [N, k] -> slots Dispatch on an [E, capacity] grid; keeps exactly the assignments
    `sort_by_expert` keeps at the same capacity."""
    flat_expert, flat_token, flat_weight = _choice_major(indices, weights)
    one_hot = expert_one_hot(flat_expert, num_experts)  # [kN, E]
    position = one_hot.cumsum(0, dtype=torch.int32).gather(1, flat_expert.unsqueeze(-1)).squeeze(-1) - 1
    kept = position < capacity
    spare = num_experts * capacity  # one extra slot takes every dropped assignment and is cut off
    slot = torch.where(kept, flat_expert * capacity + position, spare)
    token_idx = flat_token.new_zeros(spare + 1).scatter(0, slot, flat_token)[:spare]
    slot_weight = flat_weight.new_zeros(spare + 1).scatter(0, slot, flat_weight)[:spare]
    counts = one_hot.sum(0)
    return Dispatch(
        token_idx.view(num_experts, capacity),
        torch.arange(num_experts, device=indices.device).unsqueeze(-1),
        slot_weight.view(num_experts, capacity),
        counts.clamp(max=capacity),
        (~kept).sum(),
        slots=True,
    )


def uses_slots(
    mode: str,
    capacity_factor: float | None,
    dtype: torch.dtype,
    device: torch.device,
    widths: tuple[int, ...],
) -> bool:
    """`capacity` always; `auto` when a capacity factor is set (the same drops as the sorted path, without
    its host sync) or under torch.compile where `_grouped_mm` cannot run every matmul of widths `widths`
    (the batched and loop paths have data-dependent shapes: a graph break and a sync per layer)."""
    if mode == "capacity":
        return True
    if mode != "auto":
        return False
    if capacity_factor is not None:
        return True
    return torch.compiler.is_compiling() and not grouped_widths_supported(dtype, device, widths)


def plan_dispatch(
    indices: Tensor,
    weights: Tensor,
    counts: Tensor,
    capacity_factor: float | None,
    mode: str,
    dtype: torch.dtype,
    widths: tuple[int, ...],
) -> Dispatch:
    """The routing of N tokens ([N, k] indices and weights, [E] counts) laid out for the expert matmuls,
    which run in `dtype` over inputs/outputs of widths `widths`."""
    n, k = indices.shape
    num_experts = counts.shape[0]
    capacity = expert_capacity(capacity_factor, n, k, num_experts)
    if uses_slots(mode, capacity_factor, dtype, indices.device, widths):
        return slot_dispatch(indices, weights, num_experts, n if capacity is None else min(capacity, n))
    return sort_by_expert(indices, weights, num_experts, capacity, counts)


def grouped_widths_supported(dtype: torch.dtype, device: torch.device, widths: tuple[int, ...]) -> bool:
    """Whether `torch._grouped_mm` runs matmuls of these widths in `dtype` on `device` (here and now)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # CUDA's kernel, and the meta shape check torch.compile traces it with (on any device), take bf16 only
    bf16_only = device.type == "cuda" or torch.compiler.is_compiling()
    dtypes = (torch.bfloat16,) if bf16_only else (torch.float32, torch.bfloat16, torch.float16)
    if dtype not in dtypes:
        return False
    align = 16 // dtype.itemsize
    return all(width % align == 0 for width in widths)


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    return weight.dtype == x.dtype and grouped_widths_supported(
        x.dtype, x.device, (x.shape[-1], weight.shape[-1])
    )


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
    """Weighted scatter-add of the expert outputs ([M, D] or [E, C, D]) back to [N, D]; dropped assignments
    and empty slots add nothing."""
    weighted = (out * dispatch.weights.unsqueeze(-1).to(out.dtype)).reshape(-1, out.shape[-1])
    return out.new_zeros(num_tokens, out.shape[-1]).index_add(0, dispatch.token_idx.reshape(-1), weighted)

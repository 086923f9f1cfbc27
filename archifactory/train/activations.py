"""Activation memory of a training step, traced on the meta device: what autograd saves for the backward.

`trace_activations` runs one training forward of a meta-built model (shapes only: no memory, no data) under
`torch.autograd.graph.saved_tensors_hooks` and sums the bytes of every storage saved for the backward, each
storage once, parameters excluded, by the block that saved it. It is the activation term of
`archifactory plan` (`train/plan.py`); docs/plan.md states what it counts and where it over-counts.

- Each kind of block (same mixin and FFN classes, same parameter shapes) is traced twice in a row: the
  second run is what every further block of that kind adds, and what only the first saved (the rotary
  tables, computed once per forward) is counted once, outside the blocks.
- `F.scaled_dot_product_attention` is counted as its fused kernels keep it (q, k, v, the output and an
  fp32 logsumexp per query row, flash / memory-efficient, on CPU and CUDA alike): on the meta device it
  would take the math path and save the [..., Tq, Tk] matrices a real run never holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.stack import StackedMixinForCausalLM


@dataclass
class ActivationTrace:
    """Bytes autograd saves for the backward during one micro-batch's forward."""

    blocks: list[int]  # per block
    block_inputs: list[int]  # the input of each block (what a checkpointed block keeps)
    other: int  # embedding, positional, final norm, loss

    @property
    def full(self) -> int:
        return self.other + sum(self.blocks)

    @property
    def checkpointed(self) -> int:
        return self.other + sum(self.block_inputs) + max(self.blocks, default=0)


def _block_kind(block: nn.Module) -> tuple[Any, ...]:
    """Blocks of one kind save the same activations: same mixin and FFN classes, same parameter shapes."""
    shapes = tuple((name, tuple(p.shape)) for name, p in block.named_parameters())
    return type(block.mixin), type(block.ffn), shapes


@contextlib.contextmanager
def _distinct_blocks(model: StackedMixinForCausalLM) -> Iterator[list[int]]:
    """Run `model` (a throwaway meta copy) with one block of each kind, each twice in a row; yields each
    original block's kind. A deep uniform stack is traced in two blocks' time (nn.LSTM on meta is slow),
    and the second run of a kind is what each further block of it adds: what the first run also saved
    that the whole forward shares (the rotary tables, computed once per forward) is not counted per block."""
    original = model.blocks
    kinds: dict[tuple[Any, ...], int] = {}
    index = [kinds.setdefault(_block_kind(block), len(kinds)) for block in original]
    first = [original[index.index(kind)] for kind in range(len(kinds))]
    model.blocks = nn.ModuleList([block for block in first for _ in range(2)])
    try:
        yield index
    finally:
        model.blocks = original


class _FusedAttention(TorchFunctionMode):
    """Counts each `F.scaled_dot_product_attention` call as a fused kernel (flash / memory-efficient, on
    CPU and CUDA) keeps it for the backward: its q, k, v, its output and one fp32 logsumexp per query row.
    The meta device runs the math path instead, whose saved [..., Tq, Tk] matrices and fp32 copies are
    not what a real run holds, so nothing is recorded while a call runs (`inside`)."""

    def __init__(self, save: Callable[[Tensor], None], count: Callable[[int], None]) -> None:
        super().__init__()
        self.inside = False
        self.save, self.count = save, count

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.inside = True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.inside = False
        for tensor in (*args[:3], out):
            self.save(tensor)
        self.count(4 * out[..., 0].numel())  # logsumexp [B, H, Tq], fp32
        return out


def trace_activations(model: StackedMixinForCausalLM, batch: int, seq_len: int) -> ActivationTrace | str:
    """Run one training forward of a meta-device `model` and sum the bytes of every storage autograd
    saves, by the block that saved it (each kind of block traced twice, `_distinct_blocks`; attention
    through SDPA counted as its fused kernels keep it, `_FusedAttention`). A forward the meta device
    cannot run (the routed FFNs' dispatch) returns the reason as a string."""
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    keep: list[Tensor] = []  # holds the storages alive so their ids stay unique
    owner: list[int | None] = [None]
    kinds: list[int] = []
    inputs: list[int] = []
    other = 0

    def count(nbytes: int) -> None:
        nonlocal other
        if owner[0] is None:
            other += nbytes
        else:
            kinds[owner[0]] += nbytes

    def save(tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters and storage._cdata not in seen:
            seen.add(storage._cdata)
            keep.append(tensor)
            count(storage.nbytes())

    attention = _FusedAttention(save, count)

    def pack(tensor: Tensor) -> Tensor:
        if not attention.inside:
            save(tensor)
        return tensor

    calls = [0]

    def enter(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("swapped"):  # model.weights=hyper: the block's own call with its weights swapped in
            return
        owner[0] = calls[0]  # the blocks run in order: the n-th block call is position n
        calls[0] += 1
        # what a checkpointed block keeps: its input, the fp32 residual stream (autocast never stores it)
        inputs[owner[0]] = 4 * args[0].numel()

    def leave(*_: Any) -> None:
        owner[0] = None

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    model.train()
    with _distinct_blocks(model) as index:
        kinds[:] = inputs[:] = [0] * len(model.blocks)
        distinct = list(model.blocks)[::2]  # each module appears twice in a row
        hooks = [block.register_forward_pre_hook(enter, with_kwargs=True) for block in distinct]
        hooks += [block.register_forward_hook(leave) for block in distinct]
        try:
            with attention, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(ids, targets=ids, return_logits=False)
        except ArchiFactoryError:
            raise
        except Exception as error:  # an op the meta device lacks (the routed FFNs ask for autocast on it)
            first = str(error).strip().splitlines()
            return f"the meta device cannot run this forward ({type(error).__name__}: {first[0] if first else ''})"
        finally:
            for hook in hooks:
                hook.remove()
    marginal = kinds[1::2]  # each kind's second run
    other += sum(kinds[0::2]) - sum(marginal)  # what the first runs saved for the whole forward
    return ActivationTrace([marginal[k] for k in index], [inputs[2 * k + 1] for k in index], other)

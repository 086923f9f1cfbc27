"""torchrun integration: process group, DDP / FSDP2 wrapping, and rank-aware helpers.

`torchrun --nproc_per_node=N -m archifactory train … trainer.strategy=ddp|fsdp` sets RANK/WORLD_SIZE;
without them everything runs in one process. NCCL on CUDA, gloo on CPU.

Checkpoints are *gathered*: rank 0 writes the full, unsharded state (torch.distributed.checkpoint's
`get_state_dict(full_state_dict=True, cpu_offload=True)` under FSDP2), so a checkpoint resumes under
any strategy and world size that keeps the global batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from archifactory.core.errors import ArchiFactoryError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    if "RANK" not in os.environ:
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    if strategy not in ("auto", "single", "ddp", "fsdp"):
        raise ArchiFactoryError(f"trainer.strategy={strategy!r}: use auto, single, ddp or fsdp")
    if strategy == "auto":
        return "ddp" if info.world_size > 1 else "single"
    if strategy in ("ddp", "fsdp") and not dist.is_initialized():
        raise ArchiFactoryError(
            f"trainer.strategy={strategy} needs torchrun: torchrun --nproc_per_node=N -m archifactory train …"
        )
    if strategy == "single" and info.world_size > 1:
        raise ArchiFactoryError(
            "trainer.strategy=single under torchrun with several processes; use ddp or fsdp"
        )
    return strategy


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` per block, then the root). Under model.weights=hyper every block computes
    with block 0's shared weights, so the blocks are no units of their own: the root holds them all."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "hyper", None) is None:
            for block in model.blocks:
                fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> tuple[dict, dict]:
    """Gathered model and optimizer state dicts (every rank must call this under FSDP)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict,
    optimizer_state: dict,
    strategy: str,
) -> None:
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options
        )
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def gradient_sync(model: nn.Module, strategy: str, enabled: bool) -> Any:
    """Context/flag so that only the last micro-batch of an accumulation all-reduces gradients."""
    if strategy == "ddp" and not enabled:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

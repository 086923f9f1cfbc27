"""Device, precision and seeding: the few lines every entry point needs."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from archifactory.core.errors import ArchiFactoryError


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` = this rank's CUDA device when present, else CPU."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArchiFactoryError(
            f"trainer.device={requested} but no CUDA device is visible; use trainer.device=cpu"
        )
    return device


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast (fp32 master weights) on CUDA for `auto`/`bf16`; plain fp32 otherwise."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ArchiFactoryError(f"trainer.precision={precision!r}: use auto, fp32 or bf16")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(device: torch.device, num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Dense bf16 peak FLOP/s per GPU, for MFU. Matched on the device name; unknown devices report no MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None

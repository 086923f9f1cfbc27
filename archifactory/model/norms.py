"""Normalisation layers used by the Block and the final norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """`rmsnorm` (default) or `layernorm`."""
    if kind == "rmsnorm":
        return RMSNorm(hidden_size, eps)
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps)
    raise ArchiFactoryError(f"unknown norm {kind!r}; use model.norm=rmsnorm or model.norm=layernorm")

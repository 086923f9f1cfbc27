"""The short causal depthwise convolution (+ SiLU) of `kit.ShortConvolution`, in the [B, T, C] layout.

With the W = kernel − 1 past inputs p (the decode buffer, zeros at a sequence start) in front of x, tap j
reads the input s = W − j rows back:

    pre_t = Σ_j w_j ⊙ in_{t−(W−j)} (+ bias),   in_u = x_u for u >= 0, p_{W+u} for u < 0;
    out_t = SiLU(pre_t)  (or pre_t).

`F.conv1d` computes the same on [B, C, T]: two transposed copies around it, and oneDNN's depthwise
backward is slow on CPU. Here every tap is one in-place multiply-add over [B, T, C] slices of x itself
(the few rows that reach into p are added apart, so x and p are never concatenated), forward and backward:
dx_{t−s} += w_j ⊙ dpre_t, and dw_j = Σ_{b,t} dpre_t ⊙ in_{t−s}, reduced over blocks of `BLOCK_ROWS` rows
so that its products stay small and in cache. tests/model/test_kit.py holds values and gradients to
`F.conv1d`. It runs in at least fp32 (bf16 inputs are accumulated in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype

BLOCK_ROWS = 512  # rows per block of the weight gradient's product-and-sum


def causal_depthwise_conv(x: Tensor, past: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """x [B, T, C], past [B, kernel − 1, C], weight [C, kernel], bias [C] or None -> [B, T, C] in x's
    dtype."""
    dtype = compute_dtype(x.dtype)
    bias = None if bias is None else bias.to(dtype)
    out = CausalDepthwiseConv.apply(x.to(dtype), past.to(dtype), weight.to(dtype), bias, silu)
    return out.to(x.dtype)


class CausalDepthwiseConv(torch.autograd.Function):
    """x [B, T, C], past [B, W, C], weight [C, W + 1], bias [C] or None -> out [B, T, C]; see the module
    docstring. Saves x, past and (with SiLU) the pre-activation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, past: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        width, length = weight.shape[1] - 1, x.shape[1]
        pre = x * weight[:, width]  # tap W reads x_t itself
        for shift in range(1, width + 1):
            tap, edge = weight[:, width - shift], min(shift, length)
            pre[:, shift:].addcmul_(x[:, : length - edge], tap)
            pre[:, :edge].addcmul_(past[:, width - shift : width - shift + edge], tap)
        if bias is not None:
            pre += bias
        ctx.save_for_backward(x, past, weight, pre if silu else None)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, past, weight, pre = ctx.saved_tensors
        width, length = weight.shape[1] - 1, x.shape[1]
        d_pre = torch.ops.aten.silu_backward(grad, pre) if ctx.silu else grad
        d_x = d_pre * weight[:, width]
        d_past = torch.zeros_like(past)
        d_weight = torch.empty_like(weight)
        d_weight[:, width] = _product_sum(d_pre, x)
        for shift in range(1, width + 1):
            tap, edge = weight[:, width - shift], min(shift, length)
            d_x[:, : length - edge].addcmul_(d_pre[:, shift:], tap)
            reach = past[:, width - shift : width - shift + edge]  # the past inputs the first rows read
            d_past[:, width - shift : width - shift + edge].addcmul_(d_pre[:, :edge], tap)
            d_weight[:, width - shift] = _product_sum(d_pre[:, shift:], x[:, : length - edge])
            d_weight[:, width - shift] += (d_pre[:, :edge] * reach).sum((0, 1))
        d_bias = d_pre.sum((0, 1)) if ctx.has_bias else None
        return d_x, d_past, d_weight, d_bias, None


def _product_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ_{b,t} a ⊙ b over [B, T, C] -> [C], `BLOCK_ROWS` rows at a time (no [B, T, C] product)."""
    total = a.new_zeros(a.shape[-1])
    for start in range(0, a.shape[1], BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        total += (a[:, rows] * b[:, rows]).sum((0, 1))
    return total

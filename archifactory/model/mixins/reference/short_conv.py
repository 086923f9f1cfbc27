"""The short causal depthwise convolution (+ SiLU) of `kit.ShortConvolution`, in the [B, T, C] layout.

With the past inputs p (the decode buffer, zeros at a sequence start) in front of x, full = [p; x] with
W = kernel − 1 leading rows, the output is

    pre_t = Σ_j w_j ⊙ full_{t+j} (+ bias),      out_t = SiLU(pre_t)  (or pre_t).

`F.conv1d` computes the same on [B, C, T]: two transposed copies around it, and oneDNN's depthwise
backward is slow on CPU. Here every tap is one in-place multiply-add over [B, T, C] slices, forward and
backward (dfull_{t+j} += w_j ⊙ dpre_t, dw_j = Σ_{b,t} dpre_t ⊙ full_{t+j}): 1.5x faster forward +
backward than conv1d + SiLU at [4, 4096, 768] on 2 CPU threads. tests/model/test_kit.py holds values and
gradients to `F.conv1d`. It runs in at least fp32 (bf16 inputs are accumulated in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype


def causal_depthwise_conv(x: Tensor, past: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """x [B, T, C], past [B, kernel − 1, C], weight [C, kernel], bias [C] or None -> [B, T, C] in x's
    dtype."""
    dtype = compute_dtype(x.dtype)
    full = torch.cat([past.to(dtype), x.to(dtype)], dim=1)
    return CausalDepthwiseConv.apply(
        full, weight.to(dtype), None if bias is None else bias.to(dtype), silu
    ).to(x.dtype)


class CausalDepthwiseConv(torch.autograd.Function):
    """full [B, W + T, C] -> out [B, T, C]; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        kernel = weight.shape[1]
        length = full.shape[1] - kernel + 1
        pre = full[:, kernel - 1 :] * weight[:, kernel - 1]
        for tap in range(kernel - 1):
            pre.addcmul_(full[:, tap : tap + length], weight[:, tap])
        if bias is not None:
            pre += bias
        ctx.save_for_backward(full, weight, pre if silu else None)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        full, weight, pre = ctx.saved_tensors
        kernel = weight.shape[1]
        length = full.shape[1] - kernel + 1
        d_pre = torch.ops.aten.silu_backward(grad, pre) if ctx.silu else grad
        d_full = full.new_zeros(full.shape)
        d_weight = torch.empty_like(weight)
        for tap in range(kernel):
            d_full[:, tap : tap + length].addcmul_(d_pre, weight[:, tap])
            d_weight[:, tap] = (d_pre * full[:, tap : tap + length]).sum((0, 1))
        d_bias = d_pre.sum((0, 1)) if ctx.has_bias else None
        return d_full, d_weight, d_bias, None

"""BitNet b1.58's quantised linear layer in plain PyTorch (Ma et al., "The Era of 1-bit LLMs: All Large
Language Models are in 1.58 Bits", 2024; fla's `BitLinear`).

    y = Q_w(W) · Q_a(RMSNorm(x) ⊙ g)

- Q_a: 8-bit absmax activations per token, s = 127 / max|x| (max|x| at least 1e-5),
  Q_a(x) = clamp(round(s·x), −128, 127) / s;
- Q_w: ternary weights per tensor, s = 1 / mean|W| (at least 1e-5), Q_w(W) = clamp(round(s·W), −1, 1) / s.

Both are dequantised (the matmul runs in floating point, as in training) and straight-through: the
forward sees the quantised value, the backward the identity, so gradients reach the latent full-precision
weights and the norm. In the compute dtype (fp32, fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype


def straight_through(x: Tensor, quantised: Tensor) -> Tensor:
    """`quantised` in the forward, the identity to x in the backward (the straight-through estimator)."""
    return x + (quantised - x).detach()


def activation_quant(x: Tensor) -> Tensor:
    """Per-token (last axis) 8-bit absmax quantisation of x, dequantised."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def weight_quant(w: Tensor) -> Tensor:
    """Per-tensor ternary {−1, 0, 1} absmean quantisation of w, dequantised."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def bit_linear(x: Tensor, weight: Tensor, norm_weight: Tensor, eps: float) -> Tensor:
    """x [..., in] -> [..., out]: RMSNorm(x) ⊙ norm_weight, quantised per token to 8 bits, times the
    ternary `weight` [out, in], both straight-through; in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype)
    normed = x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * norm_weight.to(dtype)
    w = weight.to(dtype)
    return F.linear(straight_through(normed, activation_quant(normed)), straight_through(w, weight_quant(w)))

"""TTT-Linear's inner loop (Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States", 2024) in plain PyTorch: mini-batch gradient descent on a per-head linear model, in the dual form
of fla's `chunk_ttt_linear` (and its oracle `fla.ops.ttt.naive`).

Per head (d = head size) the hidden state is a linear map (W [d, d], b [d]). Its inner model is
f(x) = x + LN(x W + b) (LN: a LayerNorm over d with the learned gain/shift `ln_weight`, `ln_bias`), and
its self-supervised loss at token s is ℓ_s(W, b) = ½ ‖LN(k_s W + b) − (v_s − k_s)‖². Tokens are grouped
into mini-batches of `chunk_size` consecutive tokens; the mini-batch size is part of the math, not a
speed knob. Inside a mini-batch entered with (W₀, b₀), every gradient is taken at (W₀, b₀), and query t
reads the weights after a step of its own rate η_t over the gradients so far:

    W_t = W₀ − η_t Σ_{s<=t} k_sᵀ ∇_s,   b_t = b₀ − η_t Σ_{s<=t} ∇_s,   ∇_s = ∂ℓ_s/∂z at z = k_s W₀ + b₀
    z_t = q_t W_t + b_t,   o_t = z_t + LN(z_t)            (fla's residual; the paper adds q_t instead)

and the mini-batch hands (W_C, b_C) of its last token to the next one. The dual form computes every W_t
without forming it: q_t W_t = q_t W₀ − η_t Σ_{s<=t} (q_t·k_s) ∇_s.

Partial mini-batches. A stream that stops mid-mini-batch (a prefill, a decode step) keeps (W₀, b₀) and
the running sums G = Σ k_sᵀ∇_s, g = Σ ∇_s of the tokens so far, so that the next call continues the same
mini-batch exactly: that is the decode state (W₀, b₀, G, g), bounded in size. A token whose `real` flag
is False (padding, a slot before a stream's first token) adds nothing to G, g; a mini-batch hands on its
sums unapplied unless its last slot is real. (fla's oracle instead pads the sequence end with zero tokens
and applies the step anyway, so its final state differs from this one unless T is a whole number of
mini-batches; its outputs are the same.)

Layout: q/k/v [B, T, H, d], η [B, T, H], `real` [B, T] bool (None: every token), state tensors
W/G [B, H, d, d] and b/g [B, H, 1, d]. Computes in at least fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype


class TTTState(NamedTuple):
    """The inner model entering a mini-batch (weight [B, H, d, d], bias [B, H, 1, d]) and the gradient
    sums of its tokens so far (grad_weight, grad_bias, same shapes)."""

    weight: Tensor
    bias: Tensor
    grad_weight: Tensor
    grad_bias: Tensor


def layer_norm_rows(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(ẑ, 1/σ): z [..., d] normalised over d (biased variance, as fla), without affine."""
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    return (z - mean) * rstd, rstd


def inner_gradient(k: Tensor, v: Tensor, z: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """∂ℓ/∂z of ℓ = ½ ‖ln_weight ⊙ LN(z) + ln_bias − (v − k)‖² (LayerNorm's backward written out)."""
    z_hat, rstd = layer_norm_rows(z, eps)
    g = (ln_weight * z_hat + ln_bias - (v - k)) * ln_weight  # ∂ℓ/∂ẑ
    d = z.shape[-1]
    return (d * g - g.sum(-1, keepdim=True) - z_hat * (g * z_hat).sum(-1, keepdim=True)) * rstd / d


def _chunks(x: Tensor, chunk: int) -> list[Tensor]:
    """[B, T, H, W] (T a multiple of `chunk`) -> N tensors [B, H, C, W]."""
    batch, length, heads, width = x.shape
    return list(x.reshape(batch, length // chunk, chunk, heads, width).permute(1, 0, 3, 2, 4).unbind(0))


def ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: TTTState,
    real: Tensor | None = None,
    chunk_size: int = 16,
    eps: float = 1e-6,
    scale: float | None = None,
) -> tuple[Tensor, TTTState]:
    """Mini-batch TTT-Linear (module docstring) from `state`, the stream's first token at slot 0 of a
    mini-batch whose first tokens `state` already summed; `real` must hold one run of True per row that
    starts in the first mini-batch (the layer lays its rows out so). `ln_weight`/`ln_bias` [H, d]. Returns
    o [B, T, H, d] (z + LN(z), in q's dtype) and the state after the last token, in the compute dtype."""
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    batch, seq_len, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    pad = (-seq_len) % chunk_size
    if real is None:
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=q.device)
    real = F.pad(real, (0, pad), value=False)[:, :, None, None].expand(-1, -1, heads, 1)  # [B, T', H, 1]
    q, k, v = (F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    eta = F.pad(eta.to(dtype), (0, 0, 0, pad))[..., None]  # [B, T', H, 1]
    w, b = ln_weight.to(dtype)[:, None], ln_bias.to(dtype)[:, None]  # [H, 1, d]
    weight, bias, grad_w, grad_b = (x.to(dtype) for x in state)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for n, (q_n, k_n, v_n, eta_n, real_n) in enumerate(
        zip(*(_chunks(x, chunk_size) for x in (q * scale, k, v, eta, real)))
    ):
        grad = inner_gradient(k_n, v_n, k_n @ weight + bias, w, b, eps)  # [B, H, C, d]
        grad = torch.where(real_n, grad, torch.zeros((), dtype=dtype, device=q.device))
        scores = (q_n @ k_n.transpose(-1, -2)).masked_fill(~causal, 0)  # [B, H, C, C]
        read = scores @ grad + grad.cumsum(-2) + grad_b  # q_t Σ k_sᵀ∇_s + Σ ∇_s, s <= t
        if n == 0:  # only the first mini-batch can enter with sums (later ones start after a step)
            read = read + q_n @ grad_w
        outputs.append(q_n @ weight + bias - eta_n * read)
        grad_w, grad_b = grad_w + k_n.transpose(-1, -2) @ grad, grad_b + grad.sum(-2, keepdim=True)
        step, done = eta_n[:, :, -1:], real_n[:, :, -1:]  # [B, H, 1, 1]: the last slot's rate, is it real
        weight = torch.where(done, weight - step * grad_w, weight)
        bias = torch.where(done, bias - step * grad_b, bias)
        grad_w, grad_b = (torch.where(done, torch.zeros_like(g), g) for g in (grad_w, grad_b))
    z = torch.stack(outputs, dim=2).reshape(batch, heads, -1, dim)[:, :, :seq_len].transpose(1, 2)
    z_hat, _ = layer_norm_rows(z, eps)
    out = z + z_hat * ln_weight.to(dtype) + ln_bias.to(dtype)  # [B, T, H, d]
    return out.to(in_dtype), TTTState(weight, bias, grad_w, grad_b)

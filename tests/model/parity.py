"""Comparisons the per-mixer tests share, written once: one relative error, the GPU-marked comparison of a
layer's two backends (outputs and gradients under bf16 autocast), a chunked reference against a token loop
(outputs, state and gradients in fp64), and a hand-written autograd Function against the same steps under
autograd (fp64)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from archifactory.model.positional import PositionContext


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def assert_fused_matches_reference(
    layer: nn.Module,
    x: Tensor,
    context: PositionContext,
    params: list[Tensor],
    output_tol: float,
    grad_tol: float,
) -> None:
    """Run `layer` with backend fused, then reference (bf16 autocast on CUDA); the outputs agree within
    `output_tol` and the gradients of mean(y²) w.r.t. `params` within `grad_tol` (relative errors), and each
    call reports the backend it took."""
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(y.float().square().mean(), params)
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < output_tol
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < grad_tol


def assert_matches_token_loop(
    ours: tuple[Tensor, Sequence[Tensor]],
    loop: tuple[Tensor, Sequence[Tensor]],
    real: Tensor,
    leaves: tuple[Sequence[Tensor], Sequence[Tensor]],
    state_loss: Callable[[Sequence[Tensor]], Tensor],
) -> None:
    """A chunked reference's (output [B, T, ...], final state) against a token loop's on the same fp64 inputs:
    the outputs at the `real` positions and every state tensor within 1e-10, and the gradients with respect
    to each side's `leaves` of the real outputs (randomly weighted) plus `state_loss(final state)` within 1e-9."""
    (out, final), (out_ref, final_ref) = ours, loop
    torch.testing.assert_close(out[:, real], out_ref[:, real], rtol=1e-10, atol=1e-10)
    for a, b in zip(final, final_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(out) * real.view(1, -1, *[1] * (out.dim() - 2))
    grads = [
        torch.autograd.grad((output * weight).sum() + state_loss(state), inputs)
        for output, state, inputs in ((out, final, leaves[0]), (out_ref, final_ref, leaves[1]))
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def assert_function_matches_autograd(
    ours: Sequence[Tensor], plain: Sequence[Tensor], leaves: Sequence[Tensor]
) -> None:
    """The outputs of a hand-written autograd Function against the same steps under autograd, both computed
    from the same fp64 `leaves`: every output within 1e-12, and every leaf's gradient of the randomly weighted
    outputs within 1e-10."""
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(t) for t in plain]
    have = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ours, strict=True)), leaves)
    want = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, plain, strict=True)), leaves)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

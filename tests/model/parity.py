"""The GPU-marked fused-vs-reference checks of the per-mixer tests: one relative error and one comparison of a
layer's two backends (outputs and gradients under bf16 autocast), written once."""

from __future__ import annotations

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

"""The LM loss's cross-entropy (`model/loss.py`) against torch's `F.cross_entropy`: values and gradients,
ignored targets, low-precision logits, a second backward refused, and a compiled graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.loss import IGNORE_INDEX, cross_entropy_sum, lm_cross_entropy, logits_cross_entropy


def reference_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def value_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().requires_grad_(True)
    loss = fn(leaf, targets)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cross_entropy_sum_equals_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (4 * torch.randn(23, 37)).to(dtype)
    targets = torch.randint(0, 37, (23,))
    targets[[2, 3, 17]] = IGNORE_INDEX
    loss, grad = value_and_grad(cross_entropy_sum, logits, targets)
    want_loss, want_grad = value_and_grad(reference_sum, logits, targets)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grad[[2, 3, 17]] == 0), "ignored rows get no gradient"


def test_every_target_ignored_gives_zero_loss_and_gradient() -> None:
    targets = torch.full((5,), IGNORE_INDEX)
    loss, grad = value_and_grad(cross_entropy_sum, torch.randn(5, 7), targets)
    assert float(loss) == 0 and torch.all(grad == 0)
    loss, grad = value_and_grad(logits_cross_entropy, torch.randn(5, 7), targets)
    assert float(loss) == 0 and torch.all(grad == 0)


def test_mean_losses_equal_torch_mean() -> None:
    torch.manual_seed(1)
    hidden, weight = torch.randn(19, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (19,))
    targets[4] = IGNORE_INDEX
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    for got in (
        lm_cross_entropy(hidden, weight, targets),
        logits_cross_entropy(hidden @ weight.t(), targets),
    ):
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (hidden, weight)), want_grads):
            torch.testing.assert_close(a, b)


def test_a_second_backward_through_the_same_graph_is_refused() -> None:
    """The backward reuses the saved log-probabilities in place; autograd's version check must catch a
    retained graph's second backward rather than let it read the overwritten buffer."""
    logits = torch.randn(4, 6, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_compiles_whole_and_equals_eager() -> None:
    torch.manual_seed(2)
    logits, targets = torch.randn(9, 13), torch.randint(0, 13, (9,))
    targets[0] = IGNORE_INDEX
    torch._dynamo.reset()
    try:
        compiled = torch.compile(cross_entropy_sum, backend="aot_eager", fullgraph=True)
        got = value_and_grad(compiled, logits, targets)
    finally:
        torch._dynamo.reset()
    want = value_and_grad(reference_sum, logits, targets)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])

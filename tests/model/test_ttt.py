"""TTT-Linear: the reference == fla's naive oracle (outputs, final state, gradients) at odd lengths; the
inner gradient == autograd; a mid-mini-batch state and empty slots == a token loop written here; fused ==
reference on GPU. (Decode == forward and padded rows: the registry suites.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.reference.ttt import TTTState, inner_gradient, ttt_linear
from archifactory.model.mixins.ttt import TTTLinear
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_matches_token_loop

B, H, D = 2, 3, 8


def inputs(seq_len: int, dtype=torch.float64) -> list[torch.Tensor]:
    """q, k, v [B, T, H, D], η [B, T, H] in (0, 0.2), the inner LN's gain and shift [H, D]."""
    q, k, v = (torch.randn(B, seq_len, H, D, dtype=dtype) for _ in range(3))
    eta = 0.2 * torch.rand(B, seq_len, H, dtype=dtype)
    return [q, k, v, eta, 1 + 0.3 * torch.randn(H, D, dtype=dtype), 0.3 * torch.randn(H, D, dtype=dtype)]


def leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("seq_len,chunk", [(13, 4), (16, 4), (37, 16)])
def test_reference_equals_fla_naive(seq_len: int, chunk: int) -> None:
    """fla's `chunk_ttt_linear_ref` (fp32) from a random start (W₀, b₀): outputs and every gradient at
    any length; the final state where T is whole mini-batches (fla pads a partial last one with zero
    tokens and steps anyway, which this reference's decode state must not)."""
    naive = load_fla_naive("ttt")
    start = [torch.randn(B, H, D, D) * 0.3, torch.randn(B, H, 1, D) * 0.3]
    base = inputs(seq_len)
    ours, theirs = leaves(base), leaves(base)
    ours_start, theirs_start = leaves(start), leaves(start)
    zeros = [torch.zeros_like(t) for t in start]
    out, final = ttt_linear(*ours, TTTState(*ours_start, *zeros), chunk_size=chunk)
    q, k, v, eta, w, b = theirs
    out_ref, h, hb = naive.chunk_ttt_linear_ref(
        q, k, v, w, b, eta[..., None], None, 1e-6, chunk, *theirs_start, True
    )
    torch.testing.assert_close(out, out_ref.double(), rtol=1e-4, atol=1e-4)
    if seq_len % chunk == 0:
        torch.testing.assert_close(final.weight.float(), h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final.bias.float(), hb, rtol=1e-4, atol=1e-4)
        assert not final.grad_weight.any() and not final.grad_bias.any()
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), [*ours, *ours_start])
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), [*theirs, *theirs_start])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-3)


def test_inner_gradient_is_the_loss_gradient() -> None:
    k, v, z = (torch.randn(5, H, D, dtype=torch.float64) for _ in range(3))
    w, b = 1 + 0.3 * torch.randn(H, D, dtype=torch.float64), 0.3 * torch.randn(H, D, dtype=torch.float64)
    z = z.requires_grad_()
    loss = 0.5 * (F.layer_norm(z, (D,), eps=1e-6) * w + b - (v - k)).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(inner_gradient(k, v, z, w, b, 1e-6), expected, rtol=1e-10, atol=1e-12)


def token_loop(q, k, v, eta, w, b, state: TTTState, real, phase: int, chunk: int):
    """The test's own loop: gradients at the mini-batch's entering (W₀, b₀), running sums (G, g), read
    z = q(W₀ − ηG) + b₀ − ηg, a step at the mini-batch's last real slot; empty slots do nothing."""
    weight, bias, grad_w, grad_b = state
    outputs = []
    for t in range(q.shape[1]):
        if not real[t]:
            outputs.append(torch.zeros_like(q[:, t]))
            continue
        q_t, k_t, v_t = q[:, t, :, None] * D**-0.5, k[:, t, :, None], v[:, t, :, None]  # [B, H, 1, D]
        eta_t = eta[:, t, :, None, None]
        grad = inner_gradient(k_t, v_t, k_t @ weight + bias, w[:, None], b[:, None], 1e-6)
        grad_w, grad_b = grad_w + k_t.transpose(-1, -2) @ grad, grad_b + grad
        z = q_t @ (weight - eta_t * grad_w) + bias - eta_t * grad_b
        outputs.append((z + F.layer_norm(z, (D,), eps=1e-6) * w[:, None] + b[:, None])[:, :, 0])
        phase += 1
        if phase == chunk:
            weight, bias, phase = weight - eta_t * grad_w, bias - eta_t * grad_b, 0
            grad_w, grad_b = torch.zeros_like(grad_w), torch.zeros_like(grad_b)
    return torch.stack(outputs, dim=1), TTTState(weight, bias, grad_w, grad_b)


def test_mid_mini_batch_state_and_empty_slots_equal_a_token_loop() -> None:
    """A stream entering with 2 of 4 slots filled (2 empty leading slots on the grid, as the layer lays it
    out), ending mid-mini-batch: outputs and the whole state (sums unapplied), fp64, and gradients."""
    chunk, seq_len = 4, 15
    real = torch.zeros(seq_len, dtype=torch.bool)
    real[2:13] = True  # 2 leading empty slots (the phase), 11 tokens, 2 trailing empty slots
    state = TTTState(
        *(0.3 * torch.randn(B, H, *shape, dtype=torch.float64) for shape in [(D, D), (1, D)] * 2)
    )
    base = inputs(seq_len)
    ours, loop = leaves(base), leaves(base)
    out, final = ttt_linear(*ours, state, real[None].expand(B, -1), chunk_size=chunk)
    out_ref, final_ref = token_loop(*loop, state, real, 2, chunk)
    state_loss = lambda s: s.weight.sin().sum()
    assert_matches_token_loop((out, final), (out_ref, final_ref), real, (ours, loop), state_loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_reference_on_cuda(dtype: torch.dtype) -> None:
    """fla's `chunk_ttt_linear` vs the reference, T = 45 (a partial last mini-batch): outputs and every
    parameter's gradient (W₀ and b₀ included)."""
    pytest.importorskip("fla")
    torch.manual_seed(0)
    fused = TTTLinear(256, 0, num_heads=4, backend="fused").cuda()
    reference = TTTLinear(256, 0, num_heads=4, backend="reference").cuda()
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 45, 256, device="cuda")
    ctx = PositionContext(NoPositional(256, 64), 0, 45, torch.device("cuda"))
    outputs = []
    for layer in (fused, reference):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x, ctx)[0].float()
        y.square().mean().backward()
        outputs.append(y)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol)
    for (name, a), b in zip(fused.named_parameters(), reference.parameters()):
        scale = b.grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(a.grad / scale, b.grad / scale, rtol=tol, atol=tol, msg=name)

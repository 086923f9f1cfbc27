"""Gated DeltaProduct: the chunked reference == fla's naive recurrence == token steps; the layer's decode;
fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.gated_deltaproduct import (
    GatedDeltaProduct,
    chunk_delta_product,
    delta_product_step,
)
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing
NO_POS = NoPositional(32, 64)


def product_inputs(seq_len: int, steps: int, gated: bool, dtype=torch.float64):
    """q, k (unit norm), v, β ∈ (0, 2), log-decay g per head (or None), a start state; k/v/β per sub-step."""
    q = torch.randn(B, seq_len, H, K, dtype=dtype)
    k = l2_normalize(torch.randn(B, seq_len * steps, H, K, dtype=dtype))
    v = torch.randn(B, seq_len * steps, H, V, dtype=dtype)
    beta = 2 * torch.rand(B, seq_len * steps, H, dtype=dtype)
    g = -3 * torch.rand(B, seq_len, H, dtype=dtype) if gated else None
    return [q, k, v, beta, g], torch.randn(B, H, K, V, dtype=dtype)


def with_grad(tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def gradients(out, state, leaves, weight):
    loss = (out * weight).sum() + state.sin().sum()
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


def token_steps(q, k, v, beta, g, state, steps):
    """The test's own loop: one `delta_product_step` per token."""
    outputs = []
    for t in range(q.shape[1]):
        sub = slice(t * steps, (t + 1) * steps)
        gate = None if g is None else g[:, t]
        out, state = delta_product_step(q[:, t], k[:, sub], v[:, sub], beta[:, sub], gate, state)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("seq_len,steps,chunk_size", [(1, 2, 4), (13, 2, 8), (11, 3, 8)])
def test_chunked_product_equals_token_steps(gated: bool, seq_len: int, steps: int, chunk_size: int) -> None:
    """fp64: forward, final state and every gradient; chunks of sub-steps that split tokens."""
    inputs, state = product_inputs(seq_len, steps, gated)
    leaves = with_grad([*inputs, state])
    out, final = chunk_delta_product(*leaves[:5], steps, leaves[5], True, chunk_size)
    ref_leaves = with_grad([*inputs, state])
    out_ref, final_ref = token_steps(*ref_leaves, steps)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, leaves, weight), gradients(out_ref, final_ref, ref_leaves, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("gated", [True, False])
def test_matches_fla_naive_oracle(gated: bool) -> None:
    """fla's `naive_recurrent_gated_delta_product` ([B, T, H, D], k/v/β interleaved per token as ours),
    fp32, T = 19 tokens with 3 sub-steps and chunks of 16 sub-steps: outputs, final state, gradients."""
    naive_recurrent_gated_delta_product = load_fla_naive(
        "gated_delta_product"
    ).naive_recurrent_gated_delta_product

    steps = 3
    inputs, state = product_inputs(19, steps, gated, dtype=torch.float32)
    ours, theirs = with_grad(inputs), with_grad(inputs)
    out, final = chunk_delta_product(*ours, steps, state, True, 16)
    q, k, v, beta, g = theirs
    out_ref, final_ref = naive_recurrent_gated_delta_product(
        q, k, v, g, beta, K**-0.5, initial_state=state, output_final_state=True, num_householder=steps
    )
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, final_ref, theirs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_one_householder_step_is_gated_deltanet() -> None:
    """n = 1 is the gated delta rule itself: same weights, same outputs as `gated_deltanet`."""
    from archifactory.model.mixins.deltanet import GatedDeltaNet

    torch.manual_seed(0)
    product = GatedDeltaProduct(32, 0, num_heads=4, num_householder=1, allow_neg_eigval=False).double()
    gdn = GatedDeltaNet(32, 0, num_heads=4).double()
    gdn.load_state_dict(product.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    ctx = PositionContext(NO_POS, 0, 9)
    torch.testing.assert_close(product(x, ctx)[0], gdn(x, ctx)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_layer_decode_equals_full_forward(steps: int) -> None:
    torch.manual_seed(0)
    layer = GatedDeltaProduct(32, 0, num_heads=2, num_householder=steps, chunk_size=8).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full = layer(x, PositionContext(NO_POS, 0, 13))[0]
    state = layer.init_state(2, x.device, x.dtype)
    outputs = []
    for t in range(13):
        out, state = layer(x[:, t : t + 1], PositionContext(NO_POS, t, 1), state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_forget_gate", [True, False])
def test_fused_equals_reference_on_cuda(use_forget_gate: bool) -> None:
    """fla's `chunk_gated_delta_product` vs the reference under bf16 autocast: outputs, input gradients,
    and a prefill's output and state (the delta-rule family's GPU check)."""
    pytest.importorskip("fla")
    from tests.model.test_delta_rule import _fused_vs_reference

    _fused_vs_reference(GatedDeltaProduct, num_householder=2, use_forget_gate=use_forget_gate)

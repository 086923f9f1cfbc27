"""MesaNet: the chunked CG reference == fla's chunked CG oracle == token steps, ≈ the exact ridge solve;
fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.mesa_net import MesaNet
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.mesa_net import chunk_mesa, mesa_step
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, D = 2, 3, 8  # fla's mesa layer has value size = key size


def mesa_inputs(seq_len: int, dtype=torch.float64):
    """q, k (unit norm), v, log-decay g = logsigmoid(·) (mostly slow), β ∈ (0, 1), λ >= 0.25, start states."""
    q, k = (l2_normalize(torch.randn(B, seq_len, H, D, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, seq_len, H, D, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, seq_len, H, dtype=dtype) + 2)
    beta = torch.rand(B, seq_len, H, dtype=dtype)
    lamb = F.softplus(torch.randn(H, D, dtype=dtype)) + 0.25
    root = torch.randn(B, H, D, D, dtype=dtype)
    h_kk = 0.1 * root @ root.transpose(-1, -2)  # a start H must be symmetric PSD
    return [q, k, v, g, beta, lamb], (h_kk, torch.randn(B, H, D, D, dtype=dtype))


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def gradients(out, states, leaves, weight):
    loss = (out * weight).sum() + states[0].sin().sum() + states[1].cos().sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (13, 4), (21, 8)])
def test_chunked_equals_token_steps(seq_len: int, chunk_size: int) -> None:
    """fp64: outputs, both final states and every gradient (start states included) across chunks."""
    inputs, (h_kk, h_kv) = mesa_inputs(seq_len)
    ours = with_grad([*inputs, h_kk, h_kv])
    out, final = chunk_mesa(*ours[:6], 30, (ours[6], ours[7]), chunk_size)
    steps = with_grad([*inputs, h_kk, h_kv])
    q, k, v, g, beta, lamb, kk, kv = steps
    state, outputs = (kk, kv), []
    for t in range(seq_len):
        o, state = mesa_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], lamb, 30, state)
        outputs.append(o)
    out_ref = torch.stack(outputs, dim=1)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(final, state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, state, steps, weight)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_matches_fla_cg_oracle_at_an_odd_length() -> None:
    """fla's `naive_mesa_net_CG` (the kernels' algorithm: CG from zero, 1e-5 guards) needs T % C == 0, so
    it gets T = 37 zero-padded to 48 (padding leaves earlier outputs and the states unchanged); ours runs
    T = 37 in chunks of 16. fp32: outputs, final states, gradients of every input and start state."""
    oracle = load_fla_naive("mesa_net").naive_mesa_net_CG
    inputs, (h_kk, h_kv) = mesa_inputs(37, dtype=torch.float32)
    ours, theirs = with_grad([*inputs, h_kk, h_kv]), with_grad([*inputs, h_kk, h_kv])
    out, final = chunk_mesa(*ours[:6], 30, (ours[6], ours[7]), 16)
    q, k, v, g, beta, lamb, kk, kv = theirs
    pad = [F.pad(t, (0, 0, 0, 0, 0, 11)) for t in (q, k, v)] + [F.pad(t, (0, 0, 0, 11)) for t in (g, beta)]
    o_ref, kk_ref, kv_ref = oracle(*pad[:4], lamb, pad[4], 16, 30, kk, kv)
    out_ref = o_ref[:, :37]
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final[0], kk_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final[1], kv_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(
        gradients(out, final, ours, weight), gradients(out_ref, (kk_ref, kv_ref), theirs, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


def test_cg_approximates_the_exact_ridge_solve() -> None:
    """fla's `naive_mesa_net_exact` solves (H_t + diag λ) x = q exactly; 30 guarded CG steps at d = 8 get
    within the ~1e-3 the 1e-5 guards allow (a wrong operator or decay would be off by O(1))."""
    exact = load_fla_naive("mesa_net").naive_mesa_net_exact
    inputs, state = mesa_inputs(29, dtype=torch.float32)
    out, final = chunk_mesa(*inputs, 30, state, 8)
    q, k, v, g, beta, lamb = inputs
    out_ref, kk_ref, kv_ref = exact(q, k, v, g, lamb, beta, *state)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-2)
    torch.testing.assert_close(final[0], kk_ref, rtol=1e-5, atol=1e-5)


def test_layer_shapes_and_lambda_floor() -> None:
    layer = MesaNet(32, 0, num_heads=2, lambda_lower_bound=0.25).double()
    with torch.no_grad():
        layer.lambda_params.fill_(-50.0)
    assert torch.all(layer.ridge(torch.float64) >= 0.25)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, state = layer(x, PositionContext(NoPositional(32, 64), 0, 9), layer.init_state(2, x.device, x.dtype))
    assert y.shape == x.shape and state["kk"].shape == (2, 2, 16, 16)
    torch.testing.assert_close(state["kk"], state["kk"].transpose(-1, -2))  # H stays symmetric


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_reference_on_cuda() -> None:
    """fla's `chunk_mesa_net` vs the reference in fp32 (both run 30 guarded CG steps from zero): outputs,
    input gradients (fla differentiates the solve implicitly, the reference through the iterations, so a
    looser bound), and a prefill's output and states."""
    pytest.importorskip("fla")
    torch.manual_seed(0)
    fused = MesaNet(256, 1, num_heads=4, backend="fused").cuda()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = MesaNet(256, 1, num_heads=4, backend="reference").cuda()
    reference.load_state_dict(fused.state_dict())
    assert fused.backend_name() == "fused" and reference.backend_name() == "reference"
    x = torch.randn(2, 200, 256, device="cuda")
    ctx = PositionContext(NoPositional(256, 256), 0, 200, torch.device("cuda"))
    outputs, grads = [], []
    for module in (fused, reference):
        xi = x.clone().requires_grad_()
        y = module(xi, ctx)[0]
        y.square().mean().backward()
        outputs.append(y)
        grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-3)
    state = reference.init_state(2, torch.device("cuda"), torch.float32)
    fused_out, fused_state = fused(x[:, :100], ctx, {k: v.clone() for k, v in state.items()})
    ref_out, ref_state = reference(x[:, :100], ctx, state)
    torch.testing.assert_close(fused_out, ref_out, rtol=2e-2, atol=2e-3)
    for key in ("kk", "kv"):
        torch.testing.assert_close(fused_state[key], ref_state[key], rtol=1e-3, atol=1e-4)

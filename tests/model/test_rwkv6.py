"""rwkv6: chunked WKV == token-by-token WKV == fla's naive oracle; module decode; long-sequence numerics."""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.rwkv6 import RWKV6TimeMix, wkv6_chunked, wkv6_recurrent
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config


def wkv_inputs(batch, seq_len, heads, key_dim, dtype=torch.float64, decay_scale=1.0, requires_grad=False):
    """Random r, k, v, log-decay g = -exp(d) and bonus u; decays span weak to strong."""
    r, k, v = (torch.randn(batch, seq_len, heads, key_dim, dtype=dtype) for _ in range(3))
    g = -(decay_scale * torch.randn(batch, seq_len, heads, key_dim, dtype=dtype)).exp()
    u = torch.randn(heads, key_dim, dtype=dtype)
    tensors = (r, k, v, g, u)
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def grads(
    out: torch.Tensor, inputs: tuple[torch.Tensor, ...], weight: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize("seq_len", [1, 7, 8, 16, 17, 29])
def test_chunked_equals_recurrent_with_state(seq_len: int) -> None:
    inputs = wkv_inputs(2, seq_len, 3, 5, requires_grad=True)
    state = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    o_chunk, s_chunk = wkv6_chunked(*inputs, state, chunk_size=8)
    o_loop, s_loop = wkv6_recurrent(*inputs, state)
    torch.testing.assert_close(o_chunk, o_loop, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(s_chunk, s_loop, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(o_loop)
    leaves = (*inputs, state)
    for a, b in zip(
        grads(o_chunk + s_chunk.sum(), leaves, weight), grads(o_loop + s_loop.sum(), leaves, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_chunk_size_does_not_change_the_result() -> None:
    inputs = wkv_inputs(1, 45, 2, 4)
    reference = wkv6_chunked(*inputs, chunk_size=1)[0]
    for size in (4, 16, 64):
        torch.testing.assert_close(
            wkv6_chunked(*inputs, chunk_size=size)[0], reference, rtol=1e-10, atol=1e-11
        )


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(16, 4), (32, 8), (12, 5), (8, 3), (64, 16)])
def test_sub_chunking_equals_recurrent(chunk_size: int, sub_chunk_size: int) -> None:
    inputs = wkv_inputs(2, 45, 3, 5, requires_grad=True, decay_scale=2.0)
    state = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    o_chunk, s_chunk = wkv6_chunked(*inputs, state, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
    o_loop, s_loop = wkv6_recurrent(*inputs, state)
    torch.testing.assert_close(o_chunk, o_loop, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(s_chunk, s_loop, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(o_loop)
    leaves = (*inputs, state)
    for a, b in zip(
        grads(o_chunk + s_chunk.sum(), leaves, weight), grads(o_loop + s_loop.sum(), leaves, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_reference_matches_fla_naive_recurrent_oracle() -> None:
    """fla's `naive_recurrent_rwkv6` takes [B, H, T, D], log-space decays w (it applies exp(w)), computes in
    fp32, and scales r by `scale` (RWKV uses 1). Outputs, final state and input gradients must agree."""
    pytest.importorskip("fla")
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    r, k, v, g, u = wkv_inputs(2, 37, 3, 8, dtype=torch.float32, requires_grad=True)
    state = torch.randn(2, 3, 8, 8)
    ours, our_state = wkv6_chunked(r, k, v, g, u, state, chunk_size=16)
    head_first = [t.transpose(1, 2) for t in (r, k, v, g)]  # [B, H, T, D]
    oracle, oracle_state = naive_recurrent_rwkv6(
        *head_first, u, scale=1.0, initial_state=state, output_final_state=True
    )
    oracle = oracle.transpose(1, 2)
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_state, oracle_state, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(oracle)
    for name, a, b in zip(
        "rkvgu", grads(ours, (r, k, v, g, u), weight), grads(oracle, (r, k, v, g, u), weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_long_sequence_with_strong_decays_is_accurate_in_fp32() -> None:
    """T=4096, log-decays from -1e-3 to -e^6 ≈ -400 per step: the fp32 chunked form stays finite and matches
    an fp64 token loop (a difference-of-cumsums formulation loses everything here)."""
    inputs = wkv_inputs(1, 4096, 2, 8, dtype=torch.float64, decay_scale=3.0)
    expected = wkv6_recurrent(*inputs)[0]
    r, k, v, g, u = (t.float().requires_grad_() for t in inputs)
    for chunk_size, sub_chunk_size in ((16, 16), (32, 8), (64, 8)):
        for t in (r, k, v, g, u):
            t.grad = None
        out, state = wkv6_chunked(r, k, v, g, u, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
        assert torch.isfinite(out).all() and torch.isfinite(state).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
        out.square().mean().backward()
        assert all(torch.isfinite(t.grad).all() for t in (r, k, v, g, u))


def build(hidden: int = 64, heads: int = 4, **options) -> RWKV6TimeMix:
    mixin = RWKV6TimeMix(hidden, layer_idx=0, num_heads=heads, **options).double()
    with torch.no_grad():  # move every parameter off its (partly zero) init
        for p in mixin.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixin


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(64, 0), start, length)


@pytest.mark.parametrize("seq_len,prefill", [(8, 8), (17, 8)])  # a prefill ending on a boundary; past it
def test_forward_equals_prefill_plus_decode_across_chunk_boundaries(seq_len: int, prefill: int) -> None:
    mixin = build(chunk_size=4)
    x = torch.randn(2, seq_len, 64, dtype=torch.float64)
    full = mixin(x, ctx(0, seq_len))[0]
    state = mixin.init_state(2, x.device, x.dtype)
    pieces = []
    if prefill:
        out, state = mixin(x[:, :prefill], ctx(0, prefill), state)
        pieces.append(out)
    for t in range(prefill, seq_len):
        out, state = mixin(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-10)
    assert set(state) == {"wkv", "shift"} and state["wkv"].shape == (2, 4, 16, 16)
    torch.testing.assert_close(state["shift"], x[:, -1])


def test_module_at_4096_tokens_with_strong_decays_is_finite() -> None:
    mixin = RWKV6TimeMix(64, layer_idx=0, num_heads=4)
    with torch.no_grad():  # half the channels forget within a token (w = exp(-e^5)), half barely decay
        mixin.time_decay.copy_(torch.where(torch.arange(64) % 2 == 0, 5.0, -8.0))
    x = torch.randn(1, 4096, 64, requires_grad=True)
    y = mixin(x, ctx(0, 4096))[0]
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mixin.parameters())


def test_builds_from_config_at_hidden_256() -> None:
    cfg = compose_config(["mixin=rwkv6", "model.hidden_size=256", "model.num_heads=4"])
    mixin = component_factory("mixin", cfg.mixin, 256)(layer_idx=0)
    x = torch.randn(1, 3, 256)
    y, _ = mixin(x, ctx(0, 3))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert mixin.head_dim == 64 and mixin.state_size(100) == 4 * 64 * 64 + 256


def test_backend_resolution_on_cpu() -> None:
    assert build(backend="auto").backend_name() == "reference"
    assert build(backend="reference").backend_name() == "reference"
    with pytest.raises(ArchiFactoryError, match="backend=fused needs CUDA"):
        build(backend="fused")(torch.randn(1, 3, 64, dtype=torch.float64), ctx(0, 3))
    with pytest.raises(ArchiFactoryError, match="not one of"):
        RWKV6TimeMix(64, 0, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_reference_on_cuda() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    fused = RWKV6TimeMix(256, 0, num_heads=4, backend="fused").cuda()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = RWKV6TimeMix(256, 0, num_heads=4, backend="reference").cuda()
    reference.load_state_dict(fused.state_dict())
    assert fused.backend_name() == "fused" and reference.backend_name() == "reference"
    x = torch.randn(2, 200, 256, device="cuda")
    outputs, input_grads = [], []
    for module in (fused, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(xi, ctx(0, 200))[0]
        y.float().square().mean().backward()
        outputs.append(y.float())
        input_grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=5e-2, atol=5e-3)
    for (name, p_fused), p_ref in zip(fused.named_parameters(), reference.parameters()):
        scale = p_ref.grad.abs().max().clamp(min=1e-6)
        error = (p_fused.grad - p_ref.grad).abs().max() / scale
        assert error < 5e-2, f"{name}: relative gradient error {error:.3g}"

"""HGRN: the chunked diagonal scan == fla's naive HGRN oracle and a float64 loop (outputs, final state,
gradients) at odd lengths across chunk boundaries; the layer == fla's HGRN layer written out by hand."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.hgrn import HGRN
from archifactory.model.mixins.reference.hgrn import chunk_hgrn, diagonal_scan
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive, recurrent_diagonal
from tests.model.parity import relative_error

CASES = [(1, 4), (7, 4), (8, 4), (13, 4), (33, 8), (70, 64)]


def inputs(seq_len: int, width: int = 6, dtype=torch.float64, decay: float = 2.0):
    x = torch.randn(2, seq_len, width, dtype=dtype)
    g = -decay * torch.rand(2, seq_len, width, dtype=dtype)
    return x, g, torch.randn(2, width, dtype=dtype)


@pytest.mark.parametrize("seq_len,chunk_size", CASES)
def test_chunked_equals_the_float64_loop(seq_len: int, chunk_size: int) -> None:
    x, g, h0 = inputs(seq_len)
    out, final = chunk_hgrn(x, g, h0, True, chunk_size)
    ref_out, ref_final = recurrent_diagonal(x, g, h0)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq_len,chunk_size", CASES)
def test_chunked_matches_fla_naive_hgrn(seq_len: int, chunk_size: int) -> None:
    naive = load_fla_naive("hgrn").naive_recurrent_hgrn
    tensors = [t.float().requires_grad_(True) for t in inputs(seq_len)]
    ours = chunk_hgrn(*tensors, True, chunk_size)
    theirs = naive(*tensors, output_final_state=True)
    upstream = [torch.randn_like(t) for t in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    loss = lambda pair: sum((t * u).sum() for t, u in zip(pair, upstream))  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(ours), tensors), torch.autograd.grad(loss(theirs), tensors)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_strong_decay_over_a_long_sequence_is_finite() -> None:
    x, g, _ = inputs(4096, decay=200.0, dtype=torch.float32)
    g[..., 0] = 0.0  # one channel never forgets
    x.requires_grad_(True)
    out, _ = chunk_hgrn(x, g, chunk_size=64)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out[0, :, 0], x[0, :, 0].detach().cumsum(0), rtol=1e-4, atol=1e-3)


@functools.cache
def compose(*overrides: str):
    return compose_config(["mixin=hgrn", "positional=none", "model.hidden_size=16", *overrides])


def build(*overrides: str) -> HGRN:
    layer = component_factory("mixin", compose(*overrides).mixin, 16)(layer_idx=1).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def options(lower_bound: float) -> tuple[str, ...]:
    return (f"mixin.lower_bound={lower_bound}", "mixin.expand_ratio=2", "mixin.chunk_size=8")


@pytest.mark.parametrize("lower_bound", [0.0, 0.3])
def test_layer_matches_fla_layer_by_hand(lower_bound: float) -> None:
    """fla's HGRNAttention: i = swiglu(i_proj x, 1 − exp f), f = logsigmoid(f_proj x) (bounded below),
    o = naive HGRN, FusedRMSNormGated(o, g_proj x), o_proj."""
    naive = load_fla_naive("hgrn").naive_recurrent_hgrn
    layer = build(*options(lower_bound))
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    i, f, gate = (x @ w.T for w in layer.ifg_proj.weight.chunk(3))
    f = F.logsigmoid(f)
    if lower_bound:
        lb = torch.tensor(lower_bound, dtype=torch.float64)
        f = torch.logaddexp(lb.log(), torch.log1p(-lb) + f)
    o, _ = naive(F.silu(i) * (1 - f.exp()), f)
    o = o.double()
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight
    expected = (normed * F.silu(gate)) @ layer.out_proj.weight.T
    y, _ = layer(x, PositionContext(NoPositional(16, 64), 0, 19))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)  # fla's oracle computes in fp32


@pytest.mark.parametrize("prefill", [1, 8, 11])  # chunks of 8: mid-chunk, on the boundary, past it
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*options(0.3))  # a lower bound (the registry suites decode the default, none)
    ctx = lambda start, length: PositionContext(NoPositional(16, 64), start, length)  # noqa: E731
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 17))
    state = layer.init_state(2, x.device, x.dtype)
    pieces = []
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces.append(out)
    for t in range(prefill, 17):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert state["recurrent"].shape == (2, layer.state_size(17))


def test_bad_options_and_cpu_backend() -> None:
    for bad in ({"lower_bound": 1.0}, {"expand_ratio": 0}, {"chunk_size": 0}):
        with pytest.raises(ArchiFactoryError, match="mixin=hgrn"):
            HGRN(16, 0, **bad)
    layer = HGRN(16, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, 16), PositionContext(NoPositional(16, 64), 0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    x, g, h0 = (t.float().cuda() for t in inputs(300, width=256))
    x.requires_grad_(True)
    g.requires_grad_(True)
    results = {}
    for backend in ("fused", "reference"):
        out, final = diagonal_scan(x, g, h0, backend, 64)
        # fla's chunk_hgrn passes no gradient to the initial state nor from the final one: training
        # (no state) never needs them
        grads = torch.autograd.grad(out.square().mean(), [x, g])
        results[backend] = (out, final.detach(), grads)
    (o_f, s_f, grads_f), (o_r, s_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(o_f, o_r) < 1e-4 and relative_error(s_f, s_r) < 1e-4
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 1e-3
    layer = HGRN(256, 0, backend="fused").cuda()
    ctx = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_f, _ = layer(x, ctx)
        layer.backend = "reference"
        y_r, _ = layer(x, ctx)
    assert relative_error(y_f, y_r) < 2e-2

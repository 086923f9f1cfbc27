"""CyFA: the two-pass chunked reference == fla's naive_recurrent_cyfa (outputs, final state, gradients) at odd
lengths across chunk boundaries and from a prefix's state; the layer == fla's CyclicFlowAttention written
out around that oracle; decoding == the full forward; long clocks keep their phase in fp32; fused ==
reference on GPU. (Padding: tests/model/test_padding_mixins.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.cyfa import CyclicFlowAttention
from archifactory.model.mixins.reference.cyfa import cyfa_reference, empty_state, pair_phases
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import assert_fused_matches_reference

HIDDEN, SLOTS, EPS = 32, 10, 1e-5


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=cyfa", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> CyclicFlowAttention:
    torch.manual_seed(0)
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def inputs(seq_len: int, heads: int = 3, key_dim: int = 8, value_dim: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    q, k = (torch.randn(2, seq_len, heads, key_dim, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, seq_len, heads, value_dim, dtype=torch.float64)
    g = -0.3 * torch.rand(2, seq_len, heads, dtype=torch.float64)
    delta = 3 * torch.rand(2, seq_len, heads, dtype=torch.float64)  # several lags per token: phases wrap
    beta = torch.rand(2, seq_len, heads, dtype=torch.float64)
    readout = (
        torch.eye(SLOTS - 1, dtype=torch.float64) + 0.2 * torch.randn(heads, SLOTS - 1, SLOTS - 1).double()
    )
    qw, kw = (1 + 0.1 * torch.randn(key_dim, dtype=torch.float64) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v, g, delta, beta, readout, qw, kw)]


def oracle(q, k, v, g, delta, beta, readout, qw, kw, state=None):
    from fla.ops.cyfa.naive import naive_recurrent_cyfa

    return naive_recurrent_cyfa(
        q, k, v, g, delta, beta, readout, qw, kw, EPS, EPS, scale=q.shape[-1] ** -0.5,
        initial_state=state, output_final_state=True,
    )  # fmt: skip


def ours(q, k, v, g, delta, beta, readout, qw, kw, state, chunk):
    scale = q.shape[-1] ** -0.5
    return cyfa_reference(rms(q, qw), rms(k, kw), v, g, delta, beta, readout, scale, state, chunk)


@pytest.mark.parametrize("seq_len,chunk", [(19, 4), (13, 5), (7, 16)])
def test_reference_matches_fla_naive(seq_len: int, chunk: int) -> None:
    pytest.importorskip("fla")
    args = inputs(seq_len)
    theirs, their_state = oracle(*args)
    mine, my_state = ours(*args, empty_state(args[0], args[2], SLOTS), chunk)
    torch.testing.assert_close(mine, theirs.double(), rtol=1e-4, atol=2e-5)
    for a, b in zip(my_state, their_state):
        torch.testing.assert_close(a, b.double(), rtol=1e-4, atol=2e-5)
    upstream = torch.randn_like(mine)
    grads = [torch.autograd.grad((o * upstream).sum(), args) for o in (mine, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("prefix,chunk", [(1, 4), (6, 5), (12, 16)])
def test_state_continues_fla_naive(prefix: int, chunk: int) -> None:
    pytest.importorskip("fla")
    args = [t.detach() for t in inputs(17)]
    head, tail = ([t[:, :prefix] for t in args[:6]], [t[:, prefix:] for t in args[:6]])
    _, mid = oracle(*head, *args[6:])
    theirs, their_state = oracle(*tail, *args[6:], state=mid)
    first, state = ours(*head, *args[6:], empty_state(args[0], args[2], SLOTS), chunk)
    mine, my_state = ours(*tail, *args[6:], state, chunk)
    torch.testing.assert_close(mine, theirs.double(), rtol=1e-4, atol=2e-5)
    for a, b in zip(my_state, their_state):
        torch.testing.assert_close(a, b.double(), rtol=1e-4, atol=2e-5)


def test_long_clock_keeps_its_phase_in_fp32() -> None:
    """Phases at clocks near 10^4 in fp32 == the same phases in fp64 (taken mod 2π on the angle)."""
    clock = torch.tensor([0.0, 0.37, 12.5, 4095.71, 9999.123])
    exact = pair_phases(clock.double(), 128)
    phase = pair_phases(clock, 128).double()
    assert torch.all(
        (phase - exact).remainder(2 * math.pi).minimum((exact - phase).remainder(2 * math.pi)) < 5e-3
    )
    angle = clock.double()[:, None] * torch.arange(64).double() * (2 * math.pi / 127)
    diff = (exact - angle).remainder(2 * math.pi)
    torch.testing.assert_close(diff.minimum(2 * math.pi - diff), torch.zeros_like(diff), atol=1e-8, rtol=0)


def fla_layer_by_hand(layer: CyclicFlowAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer: q/k/v projections, linear depthwise short convs, a = a_proj x, β = σ(b_proj x),
    δ = σ(d_proj x.detach()), g = −exp(A_log) softplus(a + dt_bias), naive_recurrent_cyfa (q/k RMSNorm inside),
    then FusedRMSNormGated(o · P, g_proj x) with a sigmoid gate, o_proj."""
    from fla.ops.cyfa.naive import naive_recurrent_cyfa

    batch, seq_len, _ = x.shape
    qkv = x @ layer.qkv_proj.weight.T
    width = layer.conv.kernel_size
    qkv = F.conv1d(F.pad(qkv.transpose(1, 2), (width - 1, 0)), layer.conv.weight, groups=qkv.shape[-1])
    q, k, v = (
        t.reshape(batch, seq_len, layer.num_heads, -1) for t in qkv.transpose(1, 2).split(layer.widths, -1)
    )
    a, beta = x @ layer.head_decay.a_proj.weight.T, torch.sigmoid(layer.b_proj(x))
    delta = torch.sigmoid(layer.d_proj(x.detach()))
    g = -layer.head_decay.A_log.exp() * F.softplus(a + layer.head_decay.dt_bias)
    o, _ = naive_recurrent_cyfa(
        q, k, v, g, delta, beta, layer.readout, layer.q_norm_weight, layer.k_norm_weight, EPS, EPS,
        scale=layer.head_k_dim**-0.5,
    )  # fmt: skip
    o = o.double() * (layer.num_slots - 1)
    gate = layer.g_proj(x).view(o.shape)
    o = rms(o, layer.norm_weight) * torch.sigmoid(gate)
    return o.flatten(-2) @ layer.o_proj.weight.T


# small chunks, few slots, values twice as wide as keys (the registry suites run the defaults)
OPTIONS = ("mixin.chunk_size=4", f"mixin.num_slots={SLOTS}", "mixin.expand_v=2")


def test_layer_matches_fla_layer_by_hand() -> None:
    pytest.importorskip("fla")
    layer = build(*OPTIONS)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(y)
    params = [
        x,
        layer.qkv_proj.weight,
        layer.d_proj.weight,
        layer.readout,
        layer.head_decay.A_log,
        layer.conv.weight,
    ]
    mine = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("prefill", [1, 5, 13])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*OPTIONS)
    x = torch.randn(2, 17, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 17))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces = [out]
    for t in range(prefill, 17):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s[0].numel() for s in state.values()) == layer.state_size(17)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="num_slots"):
        CyclicFlowAttention(HIDDEN, 0, num_slots=7)
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        CyclicFlowAttention(HIDDEN, 0, num_heads=5)
    with pytest.raises(ArchiFactoryError, match="expand"):
        CyclicFlowAttention(HIDDEN, 0, expand_k=0.3)
    assert CyclicFlowAttention(HIDDEN, 0, head_dim=16, expand_v=2).value_dim == 4 * 32
    layer = CyclicFlowAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = CyclicFlowAttention(256, 0, num_heads=4, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    params = [x, layer.qkv_proj.weight, layer.readout, layer.d_proj.weight]
    assert_fused_matches_reference(layer, x, context, params, 2e-2, 5e-2)

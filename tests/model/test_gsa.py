"""Gated slot attention: the chunked reference == fla's naive recurrent GSA (outputs, final states,
gradients) at odd lengths across chunk boundaries and from an initial state; the layer == fla's
GatedSlotAttention written out around that oracle, grouped heads included; decoding with grouped heads ==
the full forward; fused == reference on GPU. (Padding: the registry's tests/model/test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.gsa import GatedSlotAttention
from archifactory.model.mixins.reference.gsa import gsa_forward
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=gsa", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> GatedSlotAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


@pytest.mark.parametrize("seq_len,chunk,with_state", [(19, 4, False), (13, 5, True), (7, 16, True)])
def test_reference_matches_fla_naive_oracle(seq_len: int, chunk: int, with_state: bool) -> None:
    naive = load_fla_naive("gsa").naive_recurrent_gsa
    torch.manual_seed(0)
    batch, heads, dk, dv, slots = 2, 3, 8, 6, 5
    q = torch.randn(batch, seq_len, heads, dk, requires_grad=True)
    k = torch.randn(batch, seq_len, heads, dk, requires_grad=True)
    v = torch.randn(batch, seq_len, heads, dv, requires_grad=True)
    g = F.logsigmoid(torch.randn(batch, seq_len, heads, slots)).requires_grad_()
    s = -torch.expm1(g)
    state = None
    if with_state:
        state = (torch.randn(batch, heads, dk, slots), torch.randn(batch, heads, slots, dv))
    ours, ours_state = gsa_forward(q, k, v, s, g, 0.5, state, "reference", chunk)
    theirs, theirs_state = naive(q, k, v, s, g, scale=0.5, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    if with_state:
        for a, b in zip(ours_state, theirs_state):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(ours)
    # the two outputs share the graph of s = 1 − exp(g): keep it for the second gradient
    grads = [
        torch.autograd.grad((o * upstream).sum(), [q, k, v, g], retain_graph=True) for o in (ours, theirs)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def fla_layer_by_hand(layer: GatedSlotAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer: q/k/v/f projections, swish on q/k, SiLU on v, f = logsigmoid(f)/τ, s = 1 − exp f,
    naive recurrent GSA (scale 1, grouped k/v/s/f as they are), SiLU, RMSNorm over all heads, o_proj."""
    naive = load_fla_naive("gsa").naive_recurrent_gsa
    batch, seq_len, _ = x.shape
    q, k, v, f = (x @ layer.proj.weight.T).split(layer.widths, dim=-1)
    q = F.silu(q).view(batch, seq_len, layer.num_heads, -1)
    k = F.silu(k).view(batch, seq_len, layer.num_kv_heads, -1)
    v = F.silu(v).view(batch, seq_len, layer.num_kv_heads, -1)
    f = F.logsigmoid(f).view(batch, seq_len, layer.num_kv_heads, -1) / layer.normalizer
    o, _ = naive(q, k, v, 1 - f.exp(), f, scale=1.0)
    o = F.silu(o.double()).flatten(-2)
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight
    return normed @ layer.out_proj.weight.T


# grouped heads and few slots (the registry suites run the defaults)
GROUPED = ("mixin.chunk_size=5", "mixin.num_kv_heads=2", "mixin.num_slots=3")


@pytest.mark.parametrize(
    "overrides",
    [("mixin.chunk_size=4",), GROUPED],
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)  # the oracle computes in fp32
    upstream = torch.randn_like(y)
    params = [x, layer.proj.weight, layer.norm_weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefill", [1, 5, 13])  # chunks of 5: mid-chunk, on the boundary, past it
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*GROUPED)
    x = torch.randn(2, 17, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 17))
    state = layer.init_state(2, x.device, x.dtype)
    pieces = []
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces.append(out)
    for t in range(prefill, 17):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(17)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="feature_map"):
        GatedSlotAttention(HIDDEN, 0, feature_map="t2r")
    with pytest.raises(ArchiFactoryError, match="num_slots"):
        GatedSlotAttention(HIDDEN, 0, num_slots=0)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        GatedSlotAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    layer = GatedSlotAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = GatedSlotAttention(256, 0, num_heads=4, num_slots=64, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.proj.weight], 2e-2, 5e-2)

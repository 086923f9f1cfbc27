"""ABC: the chunked reference == fla's naive recurrent ABC (outputs, final states, gradients) at odd
lengths across chunk boundaries, and a prefix's state continued == the oracle over the whole sequence; the
layer == fla's ABCAttention written out around that oracle; fused == reference on GPU. (Decoding, chunk
boundaries and padding at the default options: the registry suites, tests/model/test_contract*.py and
test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.abc import ABCAttention
from archifactory.model.mixins.reference.abc import abc_forward, empty_state
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=abc", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> ABCAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def head_first(*xs: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, H, *] -> [B, H, T, *], the layout of fla's naive ABC."""
    return [x.transpose(1, 2) for x in xs]


def inputs(seq_len: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    batch, heads, dk, dv, slots = 2, 3, 8, 6, 5
    shapes = [(dk,), (dk,), (dv,), (slots,)]
    q, k, v, s = (torch.randn(batch, seq_len, heads, *shape) for shape in shapes)
    return [t.requires_grad_() for t in (q, k, v, 3 * s)]  # wide slot logits: sharp normalisers


@pytest.mark.parametrize("seq_len,chunk", [(19, 4), (13, 5), (7, 16)])
def test_reference_matches_fla_naive_oracle(seq_len: int, chunk: int) -> None:
    naive = load_fla_naive("abc").naive_recurrent_abc
    q, k, v, s = inputs(seq_len)
    ours, _ = abc_forward(q, k, v, s, None, "reference", chunk)
    theirs, _ = naive(*head_first(q, k, v, s))
    theirs = theirs.transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v, s]) for o in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix,chunk", [(1, 4), (6, 5), (12, 16)])
def test_state_continues_the_oracle(prefix: int, chunk: int) -> None:
    """A prefix run from the empty state, its state carried into the rest == the oracle over the whole
    sequence: outputs, the final memories, and the normaliser == logsumexp of every slot logit."""
    naive = load_fla_naive("abc").naive_recurrent_abc
    q, k, v, s = (t.detach() for t in inputs(17))
    theirs, (hk, hv) = naive(*head_first(q, k, v, s), output_final_state=True)
    state = empty_state(q, v, s.shape[-1])
    first, state = abc_forward(
        q[:, :prefix], k[:, :prefix], v[:, :prefix], s[:, :prefix], state, "reference", chunk
    )
    rest, state = abc_forward(
        q[:, prefix:], k[:, prefix:], v[:, prefix:], s[:, prefix:], state, "reference", chunk
    )
    torch.testing.assert_close(torch.cat([first, rest], 1), theirs.transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[0], hk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[1], hv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[2], s.logsumexp(1), rtol=1e-6, atol=1e-6)


def fla_layer_by_hand(layer: ABCAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer (use_rope off, as positional=none): q/k/v/s/g projections, optional swish input gate,
    s clamped, naive recurrent ABC, FusedRMSNormGated per head (or RMSNorm), o_proj."""
    naive = load_fla_naive("abc").naive_recurrent_abc
    batch, seq_len, _ = x.shape
    q, k, v, s, g = (x @ layer.proj.weight.T).split(layer.widths, dim=-1)
    if layer.use_input_gate:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k, v, s = (t.view(batch, seq_len, layer.num_heads, -1) for t in (q, k, v, s))
    o, _ = naive(*head_first(q, k, v, s.clamp(*layer.clamp)))
    o = o.transpose(1, 2).double()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight
    if layer.use_output_gate:
        o = o * F.silu(g.view(o.shape))
    return o.flatten(-2) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [
        ("mixin.chunk_size=4",),
        (
            "mixin.chunk_size=5",
            "mixin.num_slots=3",
            "mixin.use_input_gate=true",
            "mixin.use_output_gate=false",
        ),
        ("mixin.chunk_size=3", "mixin.clamp_min=-0.05", "mixin.clamp_max=0.05"),
    ],
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


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="clamp_min"):
        ABCAttention(HIDDEN, 0, clamp_min=-1e5)
    with pytest.raises(ArchiFactoryError, match="clamp_min"):
        ABCAttention(HIDDEN, 0, clamp_min=1.0, clamp_max=1.0)
    with pytest.raises(ArchiFactoryError, match="num_slots"):
        ABCAttention(HIDDEN, 0, num_slots=0)
    with pytest.raises(ArchiFactoryError, match="expand_k"):
        ABCAttention(HIDDEN, 0, num_heads=4, expand_k=0.1)
    layer = ABCAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = ABCAttention(256, 0, num_heads=4, num_slots=64, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.proj.weight], 2e-2, 5e-2)

"""The simple_gla mixin: the layer == fla's SimpleGatedLinearAttention written out around fla's naive
recurrent simple-GLA oracle (outputs, gradients) at odd lengths across chunk boundaries, with grouped
key/value heads; decoding == the full forward. (The shared chunked reference itself is held to fla's
oracles in test_simple_gla.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.simple_gla import SimpleGLA
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import relative_error

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        [
            "mixin=simple_gla",
            "positional=none",
            f"model.hidden_size={HIDDEN}",
            "model.num_heads=4",
            *overrides,
        ]
    )


def build(*overrides: str) -> SimpleGLA:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length)


def fla_layer_by_hand(layer: SimpleGLA, x: torch.Tensor) -> torch.Tensor:
    """fla's layer: q/k/v projections, SiLU short convs, k/v repeated over their query heads,
    gk = logsigmoid(gk_proj x) / 16, naive recurrent simple GLA, FusedRMSNormGated per head, o_proj."""
    naive = load_fla_naive("simple_gla").naive_recurrent_simple_gla
    batch, seq_len, _ = x.shape
    heads, groups = layer.num_heads, layer.num_heads // layer.num_kv_heads
    qkv = x @ layer.qkv_proj.weight.T
    if layer.conv is not None:
        kernel = layer.conv.kernel_size
        padded = torch.cat([qkv.new_zeros(batch, kernel - 1, qkv.shape[-1]), qkv], dim=1)
        windows = padded.unfold(1, kernel, 1)  # [B, T, C, K]
        qkv = F.silu((windows * layer.conv.weight[:, 0]).sum(-1))
    q, k, v = qkv.split(layer.widths, dim=-1)
    q = q.view(batch, seq_len, heads, -1)
    k, v = (t.view(batch, seq_len, layer.num_kv_heads, -1).repeat_interleave(groups, dim=2) for t in (k, v))
    gk = F.logsigmoid(x @ layer.gk_proj.weight.T + layer.gk_proj.bias) / layer.normalizer
    o, _ = naive(q, k, v, gk)  # [B, T, H, V] (fla casts to fp32 inside)
    o = o.double()
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight
    gated = normed.flatten(-2) * F.silu(x @ layer.g_proj.weight.T)
    return gated @ layer.out_proj.weight.T


# grouped key/value heads and a wider value (the registry suites run the defaults)
GROUPED = ("mixin.chunk_size=4", "mixin.num_kv_heads=2", "mixin.expand_v=2.0")


@pytest.mark.parametrize(
    "overrides",
    [
        ("mixin.chunk_size=8",),
        GROUPED,
        ("mixin.chunk_size=8", "mixin.use_short_conv=false", "mixin.expand_k=0.5"),
    ],
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)  # fla's oracle computes in fp32
    upstream = torch.randn_like(y)
    params = [x, layer.gk_proj.weight, layer.qkv_proj.weight, layer.norm_weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefill", [3, 8, 13])  # shorter than the conv window, a chunk boundary, past
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
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        SimpleGLA(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ArchiFactoryError, match="expand_k"):
        SimpleGLA(HIDDEN, 0, num_heads=4, expand_k=0.1)
    with pytest.raises(ArchiFactoryError, match="gate_logit_normalizer"):
        SimpleGLA(HIDDEN, 0, gate_logit_normalizer=0.0)
    layer = SimpleGLA(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = SimpleGLA(256, 0, num_heads=4, num_kv_heads=2, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.gk_proj.weight, layer.qkv_proj.weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2

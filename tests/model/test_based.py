"""Based: the Taylor features reproduce 1 + s + s²/2; the layer == fla's BasedLinearAttention written out
around fla's naive parallel Based oracle (outputs, gradients) at odd lengths across chunk boundaries;
fused == reference on GPU. (Decoding and padding: the registry suites, tests/model/test_contract*.py and
test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.based import Based, taylor_features, taylor_width
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=based", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> Based:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


@pytest.mark.parametrize("dim", [1, 5, 16])
def test_taylor_features_give_the_second_order_expansion(dim: int) -> None:
    q, k = torch.randn(2, 7, dim, dtype=torch.float64), torch.randn(2, 7, dim, dtype=torch.float64)
    s = (q * k).sum(-1) / dim**0.5
    phi_q, phi_k = taylor_features(q), taylor_features(k)
    assert phi_q.shape[-1] == taylor_width(dim)
    torch.testing.assert_close((phi_q * phi_k).sum(-1), 1 + s + s**2 / 2, rtol=1e-12, atol=1e-12)


def fla_layer_by_hand(layer: Based, x: torch.Tensor) -> torch.Tensor:
    """fla's layer in `parallel` mode: q/k/v projections, parallel_based (scale d^-½, normalised), o_proj."""
    naive = load_fla_naive("based").naive_parallel_based
    batch, seq_len, _ = x.shape
    q, k, v = (x @ layer.qkv_proj.weight.T).split(layer.widths, dim=-1)
    q, k, v = (t.view(batch, seq_len, layer.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    o = naive(q, k, v, scale=layer.feature_dim**-0.5, use_norm=True)
    return o.transpose(1, 2).reshape(batch, seq_len, HIDDEN) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides", [("mixin.chunk_size=8",), ("mixin.chunk_size=5", "mixin.feature_dim=6")]
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, layer.qkv_proj.weight, layer.out_proj.weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="feature_dim"):
        Based(HIDDEN, 0, feature_dim=0)
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        Based(HIDDEN, 0, num_heads=5)
    layer = Based(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Based(256, 0, num_heads=4, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qkv_proj.weight], 2e-2, 5e-2)

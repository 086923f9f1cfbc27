"""ReBased: the quadratic features reproduce (q·k)²/d; the layer == fla's ReBasedLinearAttention written
out around fla's naive parallel ReBased oracle (outputs, gradients incl. the LayerNorm's γ, β) at odd
lengths across chunk boundaries; fused == reference on GPU. (Decoding and padding: the registry suites,
tests/model/test_contract*.py and test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.rebased import ReBased, quadratic_features
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=rebased", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> ReBased:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


@pytest.mark.parametrize("dim", [1, 5, 16])
def test_quadratic_features_give_the_squared_dot_product(dim: int) -> None:
    q, k = torch.randn(2, 7, dim, dtype=torch.float64), torch.randn(2, 7, dim, dtype=torch.float64)
    phi_q, phi_k = quadratic_features(q), quadratic_features(k)
    assert phi_q.shape[-1] == dim * (dim + 1) // 2
    expected = (q * k).sum(-1) ** 2 / dim
    torch.testing.assert_close((phi_q * phi_k).sum(-1), expected, rtol=1e-12, atol=1e-12)


def fla_layer_by_hand(layer: ReBased, x: torch.Tensor) -> torch.Tensor:
    """fla's layer in `parallel` mode: q/k/v projections, LayerNorm(γ, β) of q and k per head,
    parallel_rebased (scale d^-½, normalised with eps 1e-6), o_proj."""
    naive = load_fla_naive("rebased").naive_parallel_rebased
    batch, seq_len, _ = x.shape
    q, k, v = (x @ layer.qkv_proj.weight.T).split(layer.widths, dim=-1)
    q, k, v = (t.view(batch, seq_len, layer.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]

    def norm(t: torch.Tensor) -> torch.Tensor:
        centred = t - t.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.gamma + layer.beta

    o = naive(norm(q), norm(k), v, scale=layer.feature_dim**-0.5, use_norm=True)
    return o.transpose(1, 2).reshape(batch, seq_len, HIDDEN) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides", [("mixin.chunk_size=8",), ("mixin.chunk_size=5", "mixin.feature_dim=6")]
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides, "mixin.normalizer_eps=1e-6")  # the oracle's eps
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, layer.qkv_proj.weight, layer.gamma, layer.beta, layer.out_proj.weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="feature_dim"):
        ReBased(HIDDEN, 0, feature_dim=0)
    with pytest.raises(ArchiFactoryError, match="normalizer_eps"):
        ReBased(HIDDEN, 0, normalizer_eps=-1.0)
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        ReBased(HIDDEN, 0, num_heads=5)
    layer = ReBased(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = ReBased(256, 0, num_heads=4, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qkv_proj.weight, layer.gamma], 2e-2, 5e-2)

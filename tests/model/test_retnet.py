"""RetNet: the whole layer against fla's retention oracle, chunk sizes, paper sizes, backends. (Decoding across
chunk boundaries: the registry suites, tests/model/test_contract_chunks.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.retnet import MultiScaleRetention, retention_log_decay
from archifactory.model.positional import PositionContext, RotaryPositional
from tests.helpers import compose_config
from tests.model.parity import relative_error


@functools.cache
def compose(*overrides: str):  # Hydra composition is the slow part of building; each variant once
    return compose_config(["mixin=retnet", *overrides])


def build(hidden: int = 64, heads: int = 4, positional: str = "rope", overrides=(), dtype=torch.float64):
    cfg = compose(
        f"positional={positional}", f"model.hidden_size={hidden}", f"model.num_heads={heads}", *overrides
    )
    layer = component_factory("mixin", cfg.mixin, hidden)(layer_idx=0).to(dtype)
    with torch.no_grad():  # move every parameter off its init (GroupNorm affine included)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheme = build_positional(cfg.positional, hidden, max_seq_len=128).to(dtype)
    return layer, lambda start, length: PositionContext(scheme, start, length)


def test_decays_are_the_papers() -> None:
    gammas = retention_log_decay(4, torch.device("cpu"), torch.float64).exp()
    torch.testing.assert_close(
        gammas, torch.tensor([31 / 32, 63 / 64, 127 / 128, 255 / 256], dtype=torch.float64)
    )
    # 24 heads: the slowest decay 1 - 2^-28 is still < 1 in fp32 log space
    assert (retention_log_decay(24, torch.device("cpu"), torch.float32) < 0).all()


def test_layer_matches_fla_retention_oracle() -> None:
    """q/k/v projections -> fla's naive_retention -> per-head GroupNorm -> swish gate -> out_proj, by hand."""
    naive = pytest.importorskip("fla.ops.retention.naive")
    layer, ctx = build(positional="none", dtype=torch.float32)
    x = torch.randn(2, 37, 64, requires_grad=True)
    y, _ = layer(x, ctx(0, 37))
    grad_out = torch.randn_like(y)
    (ours,) = torch.autograd.grad((y * grad_out).sum(), x)

    def by_hand(x):
        heads = lambda t: t.view(2, 37, 4, -1).transpose(1, 2)  # [B, H, T, D]
        o = naive.naive_retention(heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x)))
        o = o.transpose(1, 2).reshape(2 * 37, -1)
        normed = F.group_norm(o, 4, layer.group_norm.weight, layer.group_norm.bias, layer.group_norm.eps)
        return layer.out_proj(F.silu(layer.g_proj(x)) * normed.view(2, 37, -1))

    expected = by_hand(x)
    (theirs,) = torch.autograd.grad((expected * grad_out).sum(), x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_chunk_size_does_not_change_the_output() -> None:
    layer, ctx = build()
    x = torch.randn(1, 29, 64, dtype=torch.float64)
    outputs = []
    for size in (1, 5, 64):
        layer.chunk_size = size
        outputs.append(layer(x, ctx(0, 29))[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-10, atol=1e-12)


def test_builds_at_hidden_256_with_paper_sizes() -> None:
    layer, ctx = build(hidden=256, heads=8, dtype=torch.float32)
    assert layer.head_k_dim == 32 and layer.head_v_dim == 64
    assert sum(p.numel() for p in layer.parameters()) == 8 * 256 * 256 + 2 * 512  # 8d² + GroupNorm affine
    y, _ = layer(torch.randn(1, 5, 256), ctx(0, 5))
    assert y.shape == (1, 5, 256) and torch.isfinite(y).all()
    assert layer.state_size(70) == 8 * 32 * 64 and layer.flops_per_token(70) > 2 * 8 * 256 * 256


def test_backend_selection_on_cpu() -> None:
    layer, ctx = build()  # the YAML's backend=auto
    assert layer.backend == "auto" and layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, 64, dtype=torch.float64), ctx(0, 3))
    with pytest.raises(ArchiFactoryError, match="not one of"):
        MultiScaleRetention(64, 0, backend="triton")
    with pytest.raises(ArchiFactoryError, match="expand_v"):
        MultiScaleRetention(64, 0, num_heads=4, expand_v=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    """bf16 autocast: fla's kernel vs the reference, forward and gradients; fused prefill + decode."""
    pytest.importorskip("fla")
    layer = MultiScaleRetention(256, 0, num_heads=4, backend="fused").cuda()
    scheme = RotaryPositional(256, 512)
    ctx = lambda start, length: PositionContext(scheme, start, length, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    inputs = [x, layer.q_proj.weight, layer.v_proj.weight, layer.group_norm.weight]
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        assert layer.backend_name() == backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, ctx(0, 300))
        results[backend] = (y, torch.autograd.grad(y.float().square().mean(), inputs))
    (y_fused, grads_fused), (y_ref, grads_ref) = results["fused"], results["reference"]
    assert relative_error(y_fused, y_ref) < 2e-2
    for fused, ref in zip(grads_fused, grads_ref):
        assert relative_error(fused, ref) < 5e-2
    layer.backend = "fused"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full, _ = layer(x, ctx(0, 300))
        state = layer.init_state(2, x.device, torch.bfloat16)
        prefix, state = layer(x[:, :257], ctx(0, 257), state)
        step, state = layer(x[:, 257:258], ctx(257, 1), state)
    assert relative_error(torch.cat([prefix, step], dim=1), full[:, :258]) < 2e-2
    assert math.isfinite(full.float().sum().item())

"""Mamba2: the layer against a token-by-token SSM written from the paper, decoding, init, backends."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.mamba2 import Mamba2
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import relative_error

SMALL = ["mixin.d_state=8", "mixin.head_dim=16", "mixin.chunk_size=4"]


@functools.cache
def compose(*overrides: str):  # Hydra composition is the slow part of building; each variant once
    return compose_config(["mixin=mamba2", "positional=none", *overrides])


def build(hidden: int = 32, overrides=(), dtype=torch.float64):
    cfg = compose(f"model.hidden_size={hidden}", *overrides)
    layer = component_factory("mixin", cfg.mixin, hidden)(layer_idx=0).to(dtype)
    with torch.no_grad():  # move every parameter off its init (D = 1, norm weight = 1, ...)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheme = build_positional(cfg.positional, hidden, max_seq_len=128).to(dtype)
    return layer, lambda start, length: PositionContext(scheme, start, length)


def mamba2_by_hand(layer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """The paper's recurrence, one token at a time, from the layer's parameters (no shared code)."""
    batch, seq_len, _ = x.shape
    heads, groups, n, p = layer.num_heads, layer.n_groups, layer.d_state, layer.head_dim
    proj = x @ layer.in_proj.weight.T
    z, xbc, dt_raw = proj.split([layer.inner_dim, layer.conv_dim, heads], dim=-1)
    padded = torch.cat([xbc.new_zeros(batch, layer.conv_kernel - 1, layer.conv_dim), xbc], dim=1)
    weight = layer.conv1d.weight[:, 0]  # [C, K]
    h = x.new_zeros(batch, heads, p, n)
    outputs = []
    for t in range(seq_len):
        window = padded[:, t : t + layer.conv_kernel]  # [B, K, C]
        u = F.silu((window * weight.T).sum(1) + layer.conv1d.bias)
        xs, b, c = u.split([layer.inner_dim, groups * n, groups * n], dim=-1)
        xs = xs.view(batch, heads, p)
        group_of_head = torch.arange(heads) // (heads // groups)
        b, c = b.view(batch, groups, n)[:, group_of_head], c.view(batch, groups, n)[:, group_of_head]
        dt = F.softplus(dt_raw[:, t] + layer.dt_bias)  # [B, H]
        a_bar = torch.exp(-torch.exp(layer.A_log) * dt)
        h = a_bar[..., None, None] * h + dt[..., None, None] * xs[..., :, None] * b[..., None, :]
        y = (h * c[..., None, :]).sum(-1) + layer.D[:, None] * xs  # [B, H, P]
        gated = y.reshape(batch, groups, -1) * F.silu(z[:, t]).view(batch, groups, -1)
        normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
        outputs.append(normed.reshape(batch, -1) * layer.norm_weight)
    return torch.stack(outputs, dim=1) @ layer.out_proj.weight.T


@pytest.mark.parametrize("groups", [1, 2])
def test_layer_matches_the_recurrence_by_hand(groups: int) -> None:
    layer, ctx = build(overrides=SMALL + [f"mixin.n_groups={groups}"])
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 11))
    expected = mamba2_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad((y * upstream).sum(), [x, layer.A_log, layer.dt_bias, layer.conv1d.weight])
    theirs = torch.autograd.grad(
        (expected * upstream).sum(), [x, layer.A_log, layer.dt_bias, layer.conv1d.weight]
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefill", [2, 4, 5])
def test_prefill_and_decode_across_chunk_and_conv_boundaries(prefill: int) -> None:
    """Prefills shorter than the conv window, at and past chunk boundaries (chunk 4, kernel 4)."""
    layer, ctx = build(overrides=SMALL)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 13))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces = [out]
    for t in range(prefill, 13):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(13)


def test_init_follows_mamba_ssm() -> None:
    layer = Mamba2(256, 0, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(layer.dt_bias)
    assert layer.num_heads == 8 and layer.conv_dim == 512 + 2 * 128
    assert (dt >= 0.001 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    a = -torch.exp(layer.A_log)
    assert (a <= -1).all() and (a >= -16).all()
    assert torch.equal(layer.D, torch.ones(8)) and torch.equal(layer.norm_weight, torch.ones(512))


def test_builds_at_hidden_256() -> None:
    layer, ctx = build(hidden=256, dtype=torch.float32)
    y, _ = layer(torch.randn(2, 70, 256), ctx(0, 70))
    assert y.shape == (2, 70, 256) and torch.isfinite(y).all()
    assert layer.state_size(70) == 8 * 128 * 64 + (512 + 256) * 3


def test_long_sequence_strong_decay_is_finite() -> None:
    layer, ctx = build(hidden=16, overrides=["mixin.d_state=4", "mixin.head_dim=8"], dtype=torch.float32)
    with torch.no_grad():
        layer.A_log.copy_(torch.tensor([6.0, -6.0, 3.0, 0.0]))  # A from -403 (forget at once) to -0.0025
        layer.dt_bias.fill_(4.0)
    x = torch.randn(1, 4096, 16, requires_grad=True)
    y, _ = layer(x, ctx(0, 4096))
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bad_options_and_cpu_backends() -> None:
    with pytest.raises(ArchiFactoryError, match="head_dim=48"):
        Mamba2(64, 0, head_dim=48)
    with pytest.raises(ArchiFactoryError, match="not one of"):
        Mamba2(64, 0, backend="cuda")
    layer, ctx = build(overrides=SMALL)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, 32, dtype=torch.float64), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Mamba2(256, 0, backend="fused").cuda()
    ctx = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, ctx)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.A_log, layer.dt_bias, layer.in_proj.weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2
    layer.backend = "fused"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full, _ = layer(x, ctx)
        state = layer.init_state(2, x.device, torch.bfloat16)
        pre, state = layer(x[:, :257], ctx, state)
        step, state = layer(x[:, 257:258], ctx, state)
    assert relative_error(torch.cat([pre, step], 1), full[:, :258]) < 2e-2

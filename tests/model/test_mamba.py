"""Mamba (Mamba-1): the layer == a token-by-token selective scan written from the paper and == fla's
pure-PyTorch `Mamba.slow_forward` (outputs, gradients); decoding across chunk and conv boundaries; init."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.mamba import Mamba
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import assert_fused_matches_reference, relative_error

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(["mixin=mamba", "positional=none", f"model.hidden_size={HIDDEN}", *overrides])


def build(*overrides: str) -> Mamba:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():  # move every parameter off its init (D = 1, A_log = log n, ...)
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length)


def mamba_by_hand(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The paper's selective scan, one token at a time, from the layer's parameters (no shared code)."""
    batch, seq_len, _ = x.shape
    inner, n, kernel = layer.inner_dim, layer.d_state, layer.conv1d.kernel_size
    xs, z = (x @ layer.in_proj.weight.T).split(inner, dim=-1)
    padded = torch.cat([xs.new_zeros(batch, kernel - 1, inner), xs], dim=1)
    a = -torch.exp(layer.A_log)  # [d_inner, N]
    h = x.new_zeros(batch, inner, n)
    outputs = []
    for t in range(seq_len):
        u = F.silu((padded[:, t : t + kernel] * layer.conv1d.weight[:, 0].T).sum(1) + layer.conv1d.bias)
        dt_low, b, c = (u @ layer.x_proj.weight.T).split([layer.dt_rank, n, n], dim=-1)
        dt = F.softplus(dt_low @ layer.dt_proj.weight.T + layer.dt_proj.bias)  # [B, d_inner]
        h = torch.exp(dt[..., None] * a) * h + (dt * u)[..., None] * b[:, None, :]
        y = (h * c[:, None, :]).sum(-1) + layer.D * u
        outputs.append(y * F.silu(z[:, t]))
    return torch.stack(outputs, dim=1) @ layer.out_proj.weight.T


@pytest.mark.parametrize("seq_len,chunk_size", [(11, 4), (16, 8), (3, 64)])
def test_layer_matches_the_selective_scan_by_hand(seq_len: int, chunk_size: int) -> None:
    layer = build("mixin.d_state=4", f"mixin.chunk_size={chunk_size}")
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, seq_len))
    expected = mamba_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    params = [x, layer.A_log, layer.D, layer.dt_proj.weight, layer.x_proj.weight, layer.conv1d.weight]
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_layer_matches_fla_slow_forward() -> None:
    """fla's Mamba layer's pure-PyTorch path (its activation swapped for torch's SiLU: fla's is Triton)."""
    pytest.importorskip("fla")
    from fla.layers.mamba import Mamba as FlaMamba

    layer = build("mixin.chunk_size=8")
    fla = FlaMamba(
        hidden_size=HIDDEN, state_size=layer.d_state, intermediate_size=layer.inner_dim,
        dt_rank=layer.dt_rank, conv_kernel=4, use_conv_bias=True, layer_idx=0,
    ).double()  # fmt: skip
    fla.act = F.silu
    with torch.no_grad():
        for ours, theirs in [
            (layer.in_proj.weight, fla.in_proj.weight), (layer.conv1d.weight, fla.conv1d.weight),
            (layer.conv1d.bias, fla.conv1d.bias), (layer.x_proj.weight, fla.x_proj.weight),
            (layer.dt_proj.weight, fla.dt_proj.weight), (layer.dt_proj.bias, fla.dt_proj.bias),
            (layer.A_log, fla.A_log), (layer.D, fla.D), (layer.out_proj.weight, fla.out_proj.weight),
        ]:  # fmt: skip
            theirs.copy_(ours)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    expected, _, _ = fla.slow_forward(x)
    torch.testing.assert_close(layer(x, ctx(0, 19))[0], expected, rtol=1e-7, atol=1e-8)  # fla: A in fp32


@pytest.mark.parametrize("prefill", [2, 4, 5])
def test_prefill_and_decode_across_chunk_and_conv_boundaries(prefill: int) -> None:
    """Prefills shorter than the conv window, at and past chunk boundaries (chunk 4, kernel 4)."""
    layer = build("mixin.d_state=4", "mixin.chunk_size=4")
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
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
    layer = Mamba(64, 0, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(layer.dt_proj.bias)
    assert layer.dt_rank == 4 and layer.inner_dim == 128
    assert (dt >= 0.001 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert torch.allclose(-torch.exp(layer.A_log), -torch.arange(1.0, 17.0).expand(128, 16))
    assert torch.equal(layer.D, torch.ones(128))
    assert layer.dt_proj.weight.abs().max() <= 4**-0.5
    assert layer.state_size(100) == 128 * 16 + 128 * 3


def test_long_sequence_strong_decay_is_finite() -> None:
    layer = Mamba(16, 0, d_state=4).float()
    with torch.no_grad():
        layer.A_log[:8].fill_(6.0)  # A = -403: forget at once
        layer.A_log[8:].fill_(-6.0)  # A = -0.0025: remember
        layer.dt_proj.bias.fill_(4.0)
    x = torch.randn(1, 2048, 16, requires_grad=True)
    y, _ = layer(x, PositionContext(NoPositional(16, 4096), 0, 2048))
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bad_options_and_cpu_backend() -> None:
    for bad in ({"d_state": 0}, {"expand": 0}, {"dt_min": 0.2}, {"chunk_size": 0}):
        with pytest.raises(ArchiFactoryError, match="mixin=mamba"):
            Mamba(HIDDEN, 0, **bad)
    layer = Mamba(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Mamba(256, 0, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.A_log, layer.dt_proj.weight], 2e-2, 5e-2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full, _ = layer(x, context)
        layer.backend = "fused"
        state = layer.init_state(2, x.device, torch.bfloat16)
        pre, state = layer(x[:, :257], context, state)
        step, state = layer(x[:, 257:258], context, state)
    assert relative_error(torch.cat([pre, step], 1), full[:, :258]) < 2e-2

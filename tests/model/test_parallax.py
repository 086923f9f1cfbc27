"""Parallax: the reference == fla's naive_parallax (outputs, gradients) with grouped heads and a window; the
layer == fla's Parallax written out around that oracle; KV-cache decoding (rope, window, grouped heads) ==
the full forward; pad keys drop out (a left-padded row == the row alone); fused == reference on GPU.
Decoding and padding at the default options: the registry suites (tests/model/test_contract.py,
tests/model/test_padding.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.parallax import Parallax
from archifactory.model.mixins.reference.parallax import parallax_attention
from archifactory.model.mixins.swa import band_mask
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=parallax", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> tuple[Parallax, object]:
    cfg = compose(*overrides)
    torch.manual_seed(0)
    layer = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer, build_positional(cfg.positional, HIDDEN, max_seq_len=64).double()


def ctx(start: int, length: int, scheme=None, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(scheme or NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


@pytest.mark.parametrize("seq_len,kv_heads,window", [(19, 4, None), (13, 2, 5), (1, 1, None), (17, 1, 1)])
def test_reference_matches_fla_naive_oracle(seq_len: int, kv_heads: int, window: int | None) -> None:
    naive = load_fla_naive("parallax").naive_parallax
    torch.manual_seed(0)
    q, r = ((2 * torch.randn(2, seq_len, 4, 8, dtype=torch.float64)).requires_grad_() for _ in range(2))
    k, v = (torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    visible = causal if window is None else band_mask(seq_len, seq_len, 0, window, q.device)
    ours = parallax_attention(*(t.transpose(1, 2) for t in (q, r, k, v)), visible).transpose(1, 2)
    theirs = naive(q, r, k, v, window_size=window)  # computes in fp32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, r, k, v]) for o in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def fla_layer_by_hand(layer: Parallax, x: torch.Tensor, context: PositionContext) -> torch.Tensor:
    """fla's Parallax: q/r/k/v projections, per-head RMSNorm on q, r, k (qk_norm), rope on q, r and k (r at
    the query positions, as q), naive_parallax (window), o_proj."""
    naive = load_fla_naive("parallax").naive_parallax
    q, r, k, v = (x @ layer.qrkv_proj.weight.T).split(layer.widths, dim=-1)
    q, r, k, v = (t.unflatten(-1, (-1, layer.head_dim)) for t in (q, r, k, v))
    if layer.q_norm_weight is not None:

        def rms(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * w

        q, r, k = rms(q, layer.q_norm_weight), rms(r, layer.r_norm_weight), rms(k, layer.k_norm_weight)
    q, r, k = (context.rotate(t) for t in (q, r, k))
    o = naive(q, r, k, v, window_size=layer.window_size).double()
    return o.flatten(-2) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides",
    [(), ("positional=rope", "mixin.qk_norm=true", "mixin.num_kv_heads=2", "mixin.window_size=6")],
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer, scheme = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19, scheme))
    expected = fla_layer_by_hand(layer, x, ctx(0, 19, scheme))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    params = [x, layer.qrkv_proj.weight, *(p for p in (layer.r_norm_weight,) if p is not None)]
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# a window and one key head (multi-query): the registry suites decode and pad the defaults
WINDOWED = ("positional=rope", "mixin.window_size=5", "mixin.num_kv_heads=1")


@pytest.mark.parametrize("prefill", [1, 4, 11])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer, scheme = build(*WINDOWED)
    x = torch.randn(2, 15, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 15, scheme))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill, scheme), state)
    pieces = [out]
    for t in range(prefill, 15):
        out, state = layer(x[:, t : t + 1], ctx(t, 1, scheme), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s[0].numel() for s in state.values()) == layer.state_size(15)


def test_left_padded_row_equals_the_row_alone() -> None:
    layer, _ = build(*WINDOWED)
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    alone, _ = layer(x, ctx(0, 9))
    padded = torch.cat([100 * torch.randn(1, 3, HIDDEN, dtype=torch.float64), x], 1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 9])
    out, _ = layer(padded, ctx(0, 12, pad_mask=pad_mask))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-10, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="window_size"):
        Parallax(HIDDEN, 0, window_size=0)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        Parallax(HIDDEN, 0, num_kv_heads=3)
    layer = Parallax(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 64])
def test_fused_matches_reference_on_gpu(window: int | None) -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Parallax(256, 0, num_heads=4, num_kv_heads=2, window_size=window, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qrkv_proj.weight], 2e-2, 5e-2)

"""Sliding-window attention: the blocked reference == fla's naive windowed attention (outputs and
gradients), decoding with a bounded cache == the full forward, compile-clean on the blocked path."""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.build import build_model
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.swa import SlidingWindowAttention, mean_keys, sliding_window_attention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import relative_error


@functools.cache
def compose(*overrides: str):
    return compose_config(["mixin=swa", "model.hidden_size=32", "model.num_heads=4", *overrides])


def build(window: int, positional: str = "rope", kv_heads: int = 2):
    cfg = compose(f"positional={positional}", f"mixin.window={window}", f"mixin.num_kv_heads={kv_heads}")
    layer = component_factory("mixin", cfg.mixin, 32)(layer_idx=0).double()
    scheme = build_positional(cfg.positional, 32, max_seq_len=128).double()
    return layer, lambda start, length: PositionContext(scheme, start, length)


def qkv(seq_len: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    shapes = [(2, seq_len, heads, dim), (2, seq_len, kv_heads, dim), (2, seq_len, kv_heads, dim)]
    return [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("seq_len,window", [(23, 5), (17, 1), (16, 4), (13, 13), (9, 32), (31, 8)])
def test_reference_matches_fla_naive_windowed_attention(seq_len: int, window: int, backend: str) -> None:
    naive = load_fla_naive("attn").naive_parallel_attn
    q, k, v = qkv(seq_len)
    ours = sliding_window_attention(*(t.transpose(1, 2) for t in (q, k, v)), 0, window, None, backend)
    theirs, _ = naive(q, k, v, window_size=window)  # [B, T, H, D]
    torch.testing.assert_close(ours.transpose(1, 2), theirs, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(theirs)
    grads = torch.autograd.grad((ours.transpose(1, 2) * upstream).sum(), [q, k, v])
    expected = torch.autograd.grad((theirs * upstream).sum(), [q, k, v])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("past", [1, 3, 4])
def test_cached_keys_enter_the_blocked_path(past: int) -> None:
    """A continuation of 19 queries (> window) after `past` cached keys == the rows of one full call."""
    naive = load_fla_naive("attn").naive_parallel_attn
    q, k, v = (t.detach() for t in qkv(past + 19))
    expected, _ = naive(q, k, v, window_size=5)
    tail = sliding_window_attention(
        q[:, past:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), past, 5, None, "sdpa"
    )
    torch.testing.assert_close(tail.transpose(1, 2), expected[:, past:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positional", ["rope", "alibi", "none"])
@pytest.mark.parametrize("prefill", [0, 2, 7])  # none, shorter than the window, longer (cache cut)
def test_decode_with_a_bounded_cache_equals_full_forward(prefill: int, positional: str) -> None:
    layer, ctx = build(window=4, positional=positional)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 19))
    state = layer.init_state(2, x.device, x.dtype)
    pieces = []
    if prefill:
        out, state = layer(x[:, :prefill], ctx(0, prefill), state)
        pieces.append(out)
    for t in range(prefill, 19):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
        assert state["k"].shape[2] == min(t + 1, 3)  # never more than window - 1 keys
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-11)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(19)


def test_layer_is_gqa_when_the_window_covers_the_sequence() -> None:
    layer, ctx = build(window=64, kv_heads=2)
    gqa = component_factory("mixin", compose_config(["mixin=gqa", "mixin.num_kv_heads=2"]).mixin, 32)(
        layer_idx=0
    ).double()
    gqa.load_state_dict(layer.state_dict())
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x, ctx(0, 21))[0], gqa(x, ctx(0, 21))[0], rtol=1e-10, atol=1e-12)
    assert layer.flops_per_token(21) == gqa.flops_per_token(21)


def test_flops_grow_linearly_past_the_window() -> None:
    layer = SlidingWindowAttention(32, 0, window=8)
    assert mean_keys(4, layer.window) == 2.5 and mean_keys(8, layer.window) == 4.5
    assert mean_keys(16, layer.window) == (36 + 8 * 8) / 16 and mean_keys(16, None) == 8.5
    assert layer.state_size(100) == 2 * 32 * 7 and layer.state_size(3) == 2 * 32 * 3


def test_compile_clean_on_the_blocked_path() -> None:
    cfg = compose_config(
        ["mixin=swa", "mixin.window=8", "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2",
         "model.vocab_size=64", "model.max_seq_len=64"]
    )  # fmt: skip
    model = build_model(cfg, 64)
    ids = torch.randint(0, 64, (2, 30))
    torch._dynamo.reset()
    try:
        result = torch._dynamo.explain(model)(ids, targets=ids)
    finally:
        torch._dynamo.reset()
    assert result.graph_break_count == 0, result.break_reasons


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="window=0"):
        SlidingWindowAttention(32, 0, window=0)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        SlidingWindowAttention(32, 0, num_heads=4, num_kv_heads=3)
    assert SlidingWindowAttention(32, 0).backend_name() == "sdpa"
    layer = SlidingWindowAttention(32, 0, backend="fused")
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer.backend_name()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = SlidingWindowAttention(256, 0, num_heads=4, num_kv_heads=2, window=64, backend="fused").cuda()
    ctx = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, ctx)
        grads = torch.autograd.grad(y.float().square().mean(), [x, layer.qkv_proj.weight])
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2

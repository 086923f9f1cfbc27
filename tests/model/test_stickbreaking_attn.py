"""Stick-breaking attention: the reference == fla's naive stick-breaking attention (outputs, gradients) with
grouped heads, with and without attend_current; the layer == fla's StickBreakingAttention written out
around that oracle; KV-cache decoding == the full forward; pad keys take no share of the stick (a
left-padded row == the row alone); fused == reference on GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.reference.stickbreaking import stickbreaking_attention
from archifactory.model.mixins.stickbreaking_attn import StickBreakingAttention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        [
            "mixin=stickbreaking_attn",
            "positional=none",
            f"model.hidden_size={HIDDEN}",
            "model.num_heads=4",
            *overrides,
        ]
    )


def build(*overrides: str) -> StickBreakingAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


@pytest.mark.parametrize("seq_len,kv_heads,attend_current", [(19, 4, False), (13, 2, True), (1, 1, True)])
def test_reference_matches_fla_naive_oracle(seq_len: int, kv_heads: int, attend_current: bool) -> None:
    naive = load_fla_naive("stickbreaking_attn").naive_stickbreaking_attn
    torch.manual_seed(0)
    q = (2 * torch.randn(2, seq_len, 4, 8, dtype=torch.float64)).requires_grad_()  # sharp sticks too
    k = torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, seq_len, kv_heads, 6, dtype=torch.float64, requires_grad=True)
    ours = stickbreaking_attention(*(t.transpose(1, 2) for t in (q, k, v)), 0, attend_current).transpose(1, 2)
    theirs, _ = naive(q, k, v, attend_current=attend_current)  # fp64 inputs: computed in fp64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v]) for o in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_pad_keys_take_no_share_of_the_stick() -> None:
    """Masked keys in the middle of a row leave the weights of the others as if they were absent."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[True, False, True, True, False, False, True, True, True]])
    masked = stickbreaking_attention(q, k, v, 0, False, key_mask=keep)
    real = keep[0].nonzero().squeeze(1)
    alone = stickbreaking_attention(q[:, :, real], k[:, :, real], v[:, :, real], 0, False)
    torch.testing.assert_close(masked[:, :, real], alone, rtol=1e-12, atol=1e-12)


def fla_layer_by_hand(layer: StickBreakingAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer: q/k/v projections (with biases when asked), optional per-head RMSNorm of q and k,
    naive stick-breaking attention, o_proj."""
    naive = load_fla_naive("stickbreaking_attn").naive_stickbreaking_attn
    batch, seq_len, _ = x.shape
    q, k, v = layer.qkv_proj(x).split([HIDDEN, layer.kv_size, layer.kv_size], dim=-1)
    q, k, v = (t.view(batch, seq_len, -1, layer.head_dim) for t in (q, k, v))
    if layer.q_norm_weight is not None:
        eps = layer.norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * layer.q_norm_weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * layer.k_norm_weight
    o, _ = naive(q, k, v, attend_current=layer.attend_current)
    return o.flatten(-2) @ layer.out_proj.weight.T


# every option off its default (the registry suites decode and pad the defaults)
OPTIONS = ("mixin.num_kv_heads=2", "mixin.qk_norm=true", "mixin.qkv_bias=true", "mixin.attend_current=true")


@pytest.mark.parametrize("overrides", [(), OPTIONS])
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefill", [4, 13])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*OPTIONS)
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


def test_left_padded_row_equals_the_row_alone() -> None:
    layer = build(*OPTIONS)
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    alone, _ = layer(x, ctx(0, 9))
    padded = torch.cat([torch.randn(1, 3, HIDDEN, dtype=torch.float64), x], 1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 9])
    out, _ = layer(padded, ctx(0, 12, pad_mask))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-12, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        StickBreakingAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ArchiFactoryError, match="backend"):
        StickBreakingAttention(HIDDEN, 0, backend="sdpa")
    layer = StickBreakingAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attend_current", [False, True])
def test_fused_matches_reference_on_gpu(attend_current: bool) -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = StickBreakingAttention(256, 0, num_heads=4, num_kv_heads=2, attend_current=attend_current)
    layer = layer.cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qkv_proj.weight], 2e-2, 5e-2)

"""Positional schemes and `gqa` against hand-computed references.

The contract suite checks that every scheme composes with every mixin (causality, decode == forward); it
cannot see a scheme that is silently wrong in the same way on both paths (no rotation at all, a bias of
the wrong sign). These tests pin the numbers: RoPE on a known vector, ALiBi's slopes and sign, the
sinusoidal table, and `gqa` (every backend, grouped K/V, `qk_norm`) against an attention written out
head by head with the rotation done as 2-D rotations of coordinate pairs.
"""

from __future__ import annotations

import math

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import (
    AlibiPositional,
    LearnedPositional,
    NoPositional,
    PositionContext,
    RotaryPositional,
    SinusoidalPositional,
    alibi_slopes,
)


def test_rope_rotates_a_known_vector_by_hand_computed_angles() -> None:
    # head dim 4, theta 100: pair (0, 2) turns at 1 rad per position, pair (1, 3) at 100^(-1/2) = 0.1
    rope = RotaryPositional(hidden_size=8, max_seq_len=16, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4).repeat(1, 3, 1, 1)
    y = rope.rotate(x, torch.tensor([0, 1, 5]))
    expected = []
    for pos in (0, 1, 5):
        a0, a1 = pos * 1.0, pos * 0.1
        expected.append(
            [
                1 * math.cos(a0) - 3 * math.sin(a0),
                2 * math.cos(a1) - 4 * math.sin(a1),
                3 * math.cos(a0) + 1 * math.sin(a0),
                4 * math.cos(a1) + 2 * math.sin(a1),
            ]
        )
    torch.testing.assert_close(y.view(3, 4), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_rope_scores_depend_only_on_the_offset() -> None:
    rope = RotaryPositional(hidden_size=16, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i: int, j: int) -> float:
        return float((rope.rotate(q, torch.tensor([i])) * rope.rotate(k, torch.tensor([j]))).sum())

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # position 0 is the identity
    torch.testing.assert_close(rope.rotate(q, torch.tensor([0])), q)


def test_position_context_uses_the_cached_tables_for_the_same_rotation() -> None:
    rope = RotaryPositional(hidden_size=8, max_seq_len=16)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    ctx = PositionContext(rope, 4, 5)
    torch.testing.assert_close(ctx.rotate(x), rope.rotate(x, torch.arange(4, 9)))
    torch.testing.assert_close(ctx.rotate(x), rope.rotate(x, torch.arange(4, 9)))  # second call: cached


def test_one_context_rotates_several_head_sizes_each_with_its_own_table() -> None:
    """A hybrid stack (or MLA's rope slice) rotates different head sizes within one forward."""
    rope = RotaryPositional(hidden_size=8, max_seq_len=32)
    ctx = PositionContext(rope, 2, 5)
    wide, narrow = torch.randn(1, 5, 2, 8, dtype=torch.float64), torch.randn(1, 5, 2, 4, dtype=torch.float64)
    for _ in range(2):  # the second round reads the cached tables
        torch.testing.assert_close(ctx.rotate(wide), rope.rotate(wide, torch.arange(2, 7)))
        torch.testing.assert_close(ctx.rotate(narrow), rope.rotate(narrow, torch.arange(2, 7)))


def test_rope_refuses_an_odd_head_dimension() -> None:
    with pytest.raises(ArchiFactoryError, match="rope needs an even head dimension, got 5"):
        RotaryPositional(hidden_size=10, max_seq_len=8).rotate(torch.randn(1, 2, 2, 5), torch.arange(2))


@pytest.mark.parametrize(
    "heads,expected",
    [
        (1, [2**-8]),
        (4, [2**-2, 2**-4, 2**-6, 2**-8]),
        (8, [2.0**-i for i in range(1, 9)]),
        # not a power of two: the 4-head slopes, then every other slope of the 8-head sequence
        (6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]),
        # 12: the 8-head slopes, then every other slope of the 16-head sequence (2^(-k/2), k odd)
        (12, [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]),
    ],
)
def test_alibi_slopes_match_the_paper(heads: int, expected: list[float]) -> None:
    torch.testing.assert_close(alibi_slopes(heads).double(), torch.tensor(expected, dtype=torch.float64))


def test_alibi_bias_penalises_distance_with_a_negative_sign() -> None:
    bias = AlibiPositional(hidden_size=8, max_seq_len=0).attention_bias(
        2, torch.arange(2, 4), torch.arange(4)
    )
    # 2 heads: slopes 2^(-8/2) = 1/16 and 1/256; query 2 sees keys 0..2, query 3 keys 0..3; the future
    # (masked anyway) gets 0
    distance = torch.tensor([[2.0, 1.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    expected = torch.stack([-distance / 16, -distance / 256])
    torch.testing.assert_close(bias, expected)


def test_sinusoidal_table_matches_vaswani() -> None:
    scheme = SinusoidalPositional(hidden_size=4, max_seq_len=16)
    x = torch.zeros(1, 3, 4)
    table = scheme.embed(x, torch.tensor([0, 1, 7]))[0].double()
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...); d=4: frequencies 1 and 1/100
    expected = torch.tensor(
        [[math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)] for p in (0, 1, 7)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    x = torch.randn(1, 3, 4)
    torch.testing.assert_close(scheme.embed(x, torch.tensor([0, 1, 7])), x + table.float())


def test_sinusoidal_table_with_an_odd_width_leaves_the_last_channel_zero() -> None:
    table = SinusoidalPositional(hidden_size=5, max_seq_len=16).embed(
        torch.zeros(1, 2, 5), torch.tensor([0, 3])
    )
    expected = [[math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100), 0.0] for p in (0, 3)]
    torch.testing.assert_close(
        table[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_learned_positions_add_their_table_rows() -> None:
    scheme = LearnedPositional(hidden_size=4, max_seq_len=8)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(scheme.embed(x, torch.tensor([5, 6, 7])), x + scheme.weight.weight[5:8])


def test_learned_positions_refuse_the_first_position_past_the_table() -> None:
    scheme = LearnedPositional(hidden_size=4, max_seq_len=8)
    scheme.check_length(8)  # positions 0..7: the whole table
    with pytest.raises(ArchiFactoryError, match=r"position 8 is beyond .* table of 8.*model.max_seq_len"):
        scheme.check_length(9)


@pytest.mark.parametrize(
    "scheme", [LearnedPositional(8, 16), SinusoidalPositional(8, 16), NoPositional(8, 16)]
)
def test_additive_schemes_keep_the_activation_dtype(scheme) -> None:
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    y = scheme.embed(x, torch.arange(5))
    assert y.dtype == torch.bfloat16


def test_rope_keeps_the_activation_dtype_and_computes_in_fp32() -> None:
    rope = RotaryPositional(hidden_size=8, max_seq_len=4096)
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1000, 4000])
    y = rope.rotate(x.to(torch.bfloat16), positions)
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the result, not bf16 angles (4000 rad in bf16 is off by up to 8 rad)
    torch.testing.assert_close(y.double(), rope.rotate(x, positions), rtol=0.02, atol=0.02)


def rms(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_pairs(t: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """RoPE written as 2-D rotations: coordinate i pairs with i + D/2 and turns by pos · theta^(-2i/D)."""
    half = t.shape[-1] // 2
    out = t.clone()
    for i in range(half):
        angle = pos * theta ** (-2 * i / t.shape[-1])
        a, b = t[..., i], t[..., i + half]
        out[..., i] = a * math.cos(angle) - b * math.sin(angle)
        out[..., i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def gqa_by_hand(layer: GroupedQueryAttention, x: torch.Tensor, scheme: str, start: int) -> torch.Tensor:
    """Causal attention head by head: query head h reads key/value head h // (H / H_kv)."""
    batch, length, d = x.shape
    heads, kv_heads, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w = layer.qkv_proj.weight
    q = (x @ w[:d].t()).view(batch, length, heads, hd)
    k = (x @ w[d : d + kv_heads * hd].t()).view(batch, length, kv_heads, hd)
    v = (x @ w[d + kv_heads * hd :].t()).view(batch, length, kv_heads, hd)
    if layer.q_norm is not None:
        q = rms(q, layer.q_norm.weight, layer.q_norm.eps)
        k = rms(k, layer.k_norm.weight, layer.k_norm.eps)
    if scheme == "rope":
        q = torch.stack([rotate_pairs(q[:, t], start + t, 10000.0) for t in range(length)], 1)
        k = torch.stack([rotate_pairs(k[:, t], start + t, 10000.0) for t in range(length)], 1)
    slopes = alibi_slopes(heads).double()
    out = torch.zeros(batch, length, heads, hd, dtype=x.dtype)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(length):
            logits = torch.stack([(q[:, i, h] * k[:, j, g]).sum(-1) for j in range(i + 1)], -1)
            logits = logits / math.sqrt(hd)
            if scheme == "alibi":
                logits = logits - slopes[h] * torch.tensor([i - j for j in range(i + 1)], dtype=x.dtype)
            p = logits.softmax(-1)  # [B, i+1]
            out[:, i, h] = (p[:, :, None] * v[:, : i + 1, g]).sum(1)
    return out.reshape(batch, length, d) @ layer.out_proj.weight.t()


SCHEMES = {"rope": RotaryPositional, "alibi": AlibiPositional, "none": NoPositional}


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("scheme", ["rope", "alibi", "none"])
@pytest.mark.parametrize("kv_heads,qk_norm", [(4, False), (2, True), (1, False)])
def test_gqa_equals_attention_written_out_by_hand(
    backend: str, scheme: str, kv_heads: int, qk_norm: bool
) -> None:
    layer = GroupedQueryAttention(32, 0, num_heads=4, num_kv_heads=kv_heads, qk_norm=qk_norm, backend=backend)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():  # norm gains off 1, so qk_norm's weights matter too
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    start = 3  # a non-zero offset: positions are absolute
    ctx = PositionContext(SCHEMES[scheme](32, 64), start, 6)
    y, _ = layer(x, ctx)
    torch.testing.assert_close(y, gqa_by_hand(layer, x, scheme, start), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_gqa_decode_with_grouped_kv_equals_attention_by_hand(scheme: str) -> None:
    """The cached path (past > 0: the SDPA call with an explicit mask) with grouped K/V."""
    layer = GroupedQueryAttention(32, 0, num_heads=4, num_kv_heads=2, backend="sdpa").double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    positional = SCHEMES[scheme](32, 64)
    state = layer.init_state(1, torch.device("cpu"), torch.float64)
    _, state = layer(x[:, :3], PositionContext(positional, 0, 3), state)
    y, _ = layer(x[:, 3:], PositionContext(positional, 3, 2), state)
    torch.testing.assert_close(y, gqa_by_hand(layer, x, scheme, 0)[:, 3:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [4, 2])  # as many tokens as query heads, or as K/V heads
def test_gqa_grouped_kv_when_the_length_equals_a_head_count(length: int) -> None:
    layer = GroupedQueryAttention(32, 0, num_heads=4, num_kv_heads=2, backend="sdpa").double()
    x = torch.randn(1, length, 32, dtype=torch.float64)
    y, _ = layer(x, PositionContext(RotaryPositional(32, 64), 0, length))
    torch.testing.assert_close(y, gqa_by_hand(layer, x, "rope", 0), rtol=1e-6, atol=1e-6)


def test_gqa_options_build_what_they_name() -> None:
    for qk_norm in (False, True):
        layer = GroupedQueryAttention(32, 0, num_heads=4, qk_norm=qk_norm)
        assert (layer.q_norm is not None, layer.k_norm is not None) == (qk_norm, qk_norm)
    assert GroupedQueryAttention(32, 0, backend="reference").backend_name() == "reference"
    for backend in ("auto", "sdpa", "fused"):
        assert GroupedQueryAttention(32, 0, backend=backend).backend_name() == "sdpa"
    with pytest.raises(ArchiFactoryError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        GroupedQueryAttention(32, 0, num_heads=4, num_kv_heads=3)

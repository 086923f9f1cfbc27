"""FLOPs per token against the closed forms (2 FLOPs per multiply-accumulate).

MFU and the report's compute axis are computed from these numbers, so a loose lower bound (the contract
suite's) is not enough: the default architecture (`gqa` + `swiglu`) and the whole-model sum are pinned
to hand-written formulas here.
"""

from __future__ import annotations

import pytest
import torch

from archifactory.model.build import build_model
from archifactory.model.ffn.mlp import MLP
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.mixins.attention import GroupedQueryAttention
from tests.helpers import compose_config


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seq_len", [1, 256, 4096])
def test_gqa_flops_closed_form(kv_heads: int, seq_len: int) -> None:
    d, heads = 64, 4
    kv_width = kv_heads * (d // heads)  # 16 per head
    layer = GroupedQueryAttention(d, 0, num_heads=heads, num_kv_heads=kv_heads)
    projections = 2 * d * d + 2 * d * kv_width + 2 * d * kv_width + 2 * d * d  # q, k, v, out
    # query t (1-based) reads t keys: q·k and p·v cost 2·d each per key (all heads together)
    attention = (2 * d + 2 * d) * sum(range(1, seq_len + 1)) / seq_len
    assert layer.flops_per_token(seq_len) == pytest.approx(projections + attention, rel=1e-12)


def test_swiglu_and_mlp_flops_closed_form() -> None:
    swiglu = SwiGLU(64, 0)  # 8/3 · 64 = 170.7, rounded up to a multiple of 64: 192
    assert swiglu.intermediate_size == 192
    assert swiglu.flops_per_token() == 2 * 64 * 192 * 3  # gate, up, out
    mlp = MLP(64, 0)
    assert mlp.flops_per_token() == 2 * 64 * mlp.intermediate_size * 2  # up, out
    assert mlp.intermediate_size == 256


def test_model_flops_are_the_blocks_plus_the_head() -> None:
    cfg = compose_config(
        ["model.hidden_size=64", "model.num_layers=3", "model.num_heads=4", "mixin=gqa", "ffn=swiglu"]
    )
    model = build_model(cfg, vocab_size=100)
    kv = model.blocks[0].mixin.num_kv_heads * 16
    per_block = (4 * 64 * 64 + 4 * 64 * kv) + 4 * 64 * (128 + 1) / 2 + 6 * 64 * 192
    assert model.flops_per_token(128) == pytest.approx(3 * per_block + 2 * 64 * 100, rel=1e-12)


def test_default_ffns_are_bias_free_and_spend_two_flops_per_weight() -> None:
    """Every weight of a dense FFN multiplies each token once: FLOPs/token == 2 x parameters."""
    for layer in (SwiGLU(64, 0), MLP(64, 0)):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == (3 if isinstance(layer, SwiGLU) else 2)
        assert all(m.bias is None for m in linears), "bias defaults to off"
        assert layer.flops_per_token() == 2 * sum(p.numel() for p in layer.parameters())


def test_swiglu_and_mlp_compute_their_formulas() -> None:
    x = torch.randn(2, 3, 64)
    swiglu, mlp = SwiGLU(64, 0), MLP(64, 0)
    s = torch.nn.functional.silu(x @ swiglu.gate_proj.weight.t()) * (x @ swiglu.up_proj.weight.t())
    torch.testing.assert_close(swiglu(x)[0], s @ swiglu.out_proj.weight.t())
    m = torch.nn.functional.gelu(x @ mlp.in_proj.weight.t()) @ mlp.out_proj.weight.t()
    torch.testing.assert_close(mlp(x)[0], m)
    assert swiglu(x)[1] == {} and mlp(x)[1] == {}

"""DeltaFormer: the reference == fla's naive_deltaformer_attn (outputs and gradients; grouped heads through
k/v repeated for the oracle, odd lengths, β outside (0, 1) too); the layer == fla's DeltaFormerAttention
written out around that oracle; decoding from the key + corrected-value cache == the full forward; a
left-padded row == the row alone; fused == reference on GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.deltaformer import DeltaFormerAttention
from archifactory.model.mixins.reference.deltaformer import deltaformer_attention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


def ours(q, k, v, beta) -> torch.Tensor:
    """The reference on fla's [B, T, H, D] layout, no cache."""
    empty = q.new_zeros(q.shape[0], q.shape[2], 0, q.shape[3])  # no cached u
    o, _ = deltaformer_attention(*(t.transpose(1, 2) for t in (q, k, v, beta)), empty)
    return o.transpose(1, 2)


@pytest.mark.parametrize("seq_len,kv_heads", [(19, 4), (13, 2), (2, 1)])
def test_reference_matches_fla_naive_oracle(seq_len: int, kv_heads: int) -> None:
    naive = load_fla_naive("deltaformer").naive_deltaformer_attn
    torch.manual_seed(seq_len)
    q = torch.randn(2, seq_len, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    beta = (1.5 * torch.rand(2, seq_len, 4, dtype=torch.float64) - 0.25).requires_grad_()  # in (-0.25, 1.25)
    mine = ours(q, k, v, beta)
    groups = 4 // kv_heads
    theirs = naive(q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2), beta)  # u in fp32
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(mine)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v, beta]) for o in (mine, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@functools.cache
def compose(*overrides: str):
    return compose_config(
        [
            "mixin=deltaformer",
            "positional=rope",
            f"model.hidden_size={HIDDEN}",
            "model.num_heads=4",
            *overrides,
        ]
    )


def build(*overrides: str) -> DeltaFormerAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None, rope: bool = True) -> PositionContext:
    scheme = (
        build_positional(compose().positional, HIDDEN, max_seq_len=64).double()
        if rope
        else NoPositional(HIDDEN, 64)
    )
    return PositionContext(scheme, start, length, pad_mask=pad_mask)


def fla_layer_by_hand(layer: DeltaFormerAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer with no positional scheme: q/k/v projections, optional per-head RMSNorm of q and k,
    β = b_proj(x) (squashed with `beta_activation=sigmoid`), naive DeltaFormer attention, o_proj."""
    naive = load_fla_naive("deltaformer").naive_deltaformer_attn
    batch, seq_len, _ = x.shape
    q, k, v = layer.qkv_proj(x).split([HIDDEN, layer.kv_size, layer.kv_size], dim=-1)
    q, k, v = (t.view(batch, seq_len, -1, layer.head_dim) for t in (q, k, v))
    if layer.q_norm_weight is not None:
        eps = layer.norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * layer.q_norm_weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * layer.k_norm_weight
    groups = layer.num_heads // layer.num_kv_heads
    beta = layer.b_proj(x)
    beta = beta.sigmoid() if layer.beta_activation == "sigmoid" else beta
    o = naive(q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2), beta)
    return o.flatten(-2) @ layer.out_proj.weight.T


# every option off its default (the registry suites decode and pad the defaults)
OPTIONS = ("mixin.num_kv_heads=2", "mixin.qk_norm=true", "mixin.beta_activation=sigmoid")


@pytest.mark.parametrize("overrides", [(), OPTIONS])
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 15, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 15, rope=False))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    mine = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefill", [6, 13])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*OPTIONS)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 19))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces = [out]
    for t in range(prefill, 19):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(19)


def test_left_padded_row_equals_the_row_alone() -> None:
    layer = build(*OPTIONS)
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    alone, _ = layer(x, ctx(0, 9))
    padded = torch.cat([torch.randn(1, 3, HIDDEN, dtype=torch.float64), x], 1)
    context = ctx(0, 12, torch.tensor([[False] * 3 + [True] * 9]))
    context.lead = torch.tensor([3])
    out, _ = layer(padded, context)
    assert out.isfinite().all()
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-10, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="beta_activation"):
        DeltaFormerAttention(HIDDEN, 0, beta_activation="tanh")
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        DeltaFormerAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    layer = DeltaFormerAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), PositionContext(NoPositional(HIDDEN, 64), 0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    layer = DeltaFormerAttention(256, 0, num_heads=4, num_kv_heads=2, beta_activation="sigmoid").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    params = [x, layer.qkv_proj.weight, layer.b_proj.weight]
    assert_fused_matches_reference(layer, x, context, params, 3e-2, 6e-2)

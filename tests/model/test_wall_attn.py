"""Wall attention: the blocked reference == fla's naive_wall_attn (outputs, gradients) with grouped heads, a
window and the scalar gate, at odd lengths across query blocks, and under decays strong enough to overflow
any unanchored factorisation; the layer == fla's WallAttention written out around that oracle; KV-cache
decoding == the full forward; pad keys drop out (a left-padded row == the row alone); fused == reference on
GPU. fla's oracle takes its running sums from a Triton kernel: the tests give it a plain cumsum."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.reference.wall_attn import wall_attention
from archifactory.model.mixins.swa import band_mask
from archifactory.model.mixins.wall_attn import WallAttention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import relative_error

HIDDEN = 32


def plain_cumsum(g: torch.Tensor, cu_seqlens=None, scale: float = 1.0) -> torch.Tensor:
    """fla's chunk_global_cumsum (time = dim 1, inclusive, times `scale`) without Triton."""
    assert cu_seqlens is None
    return g.float().cumsum(1) * scale


@functools.cache
def naive_wall():
    module = load_fla_naive("wall_attn")
    module.chunk_global_cumsum = plain_cumsum
    return module.naive_wall_attn


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=wall_attn", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> tuple[WallAttention, object]:
    cfg = compose("mixin.block_size=4", *overrides)
    torch.manual_seed(0)
    layer = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for bias in layer._gate_biases():
            bias.fill_(1.0)  # decays that matter at these lengths
    return layer, build_positional(cfg.positional, HIDDEN, max_seq_len=64).double()


def ctx(start: int, length: int, scheme=None, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(scheme or NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def inputs(seq_len: int, kv_heads: int, decay: float):
    torch.manual_seed(0)
    q = torch.randn(2, seq_len, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = (decay * F.logsigmoid(torch.randn(2, seq_len, 4, 8, dtype=torch.float64))).requires_grad_()
    gs = F.logsigmoid(torch.randn(2, seq_len, 4, dtype=torch.float64)).requires_grad_()
    return q, k, v, g, gs


def ours(q, k, v, g, gs, window, block):
    seq_len = q.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    visible = causal if window is None else band_mask(seq_len, seq_len, 0, window, q.device)
    gate = None if gs is None else gs.cumsum(1).transpose(1, 2)
    q, k, v, decay = (t.transpose(1, 2) for t in (q, k, v, g.cumsum(1)))
    return wall_attention(q, k, v, decay, visible, gate, block=block).transpose(1, 2)


@pytest.mark.parametrize(
    "seq_len,kv_heads,window,scalar,block",
    [(19, 4, None, False, 4), (13, 2, 5, True, 5), (1, 1, None, True, 4), (23, 2, None, True, 8)],
)
def test_reference_matches_fla_naive_oracle(seq_len, kv_heads, window, scalar, block) -> None:
    q, k, v, g, gs = inputs(seq_len, kv_heads, 1.0)
    gs = gs if scalar else None
    mine = ours(q, k, v, g, gs, window, block)
    theirs = naive_wall()(q, k, v, g, scale=8**-0.5, window_size=window, g_scalar=gs)  # in fp32
    torch.testing.assert_close(mine, theirs.double(), rtol=1e-5, atol=1e-5)
    wrt = [q, k, v, g] + ([gs] if scalar else [])
    upstream = torch.randn_like(mine)
    grads = [torch.autograd.grad((o * upstream).sum(), wrt) for o in (mine, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b.double(), rtol=1e-4, atol=1e-4)


def pairwise_wall(q, k, v, g):
    """Wall attention from the [B, T, T, H, K] pairwise decays in fp64, masked before the exp (so its
    gradients stay finite where fla's oracle, exponentiating the masked pairs too, gets inf · 0)."""
    seq_len, groups = q.shape[1], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    total = g.cumsum(1)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, :, :, None, None]
    decay = (total[:, :, None] - total[:, None, :]).masked_fill(~causal, float("-inf")).exp()
    logits = (q[:, :, None] * k[:, None] * decay).sum(-1) * q.shape[-1] ** -0.5  # [B, Tq, Tk, H]
    weights = logits.masked_fill(~causal[..., 0], float("-inf")).softmax(2)
    return torch.einsum("bqkh,bkhd->bqhd", weights, v)


def test_strong_decays_stay_finite() -> None:
    """log-decays down to −60 per step: exp(P_j) under any single anchor would overflow; the blocked
    reference == fla's oracle (outputs) and the pairwise form (outputs, gradients), all finite."""
    q, k, v, g, _ = inputs(23, 2, 60.0)
    mine = ours(q, k, v, g, None, None, 8)
    theirs = naive_wall()(q, k, v, g, scale=8**-0.5)
    torch.testing.assert_close(mine, theirs.double(), rtol=1e-5, atol=1e-5)
    exact = pairwise_wall(q, k, v, g)
    torch.testing.assert_close(mine, exact, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(mine)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v, g]) for o in (mine, exact)]
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def fla_layer_by_hand(layer: WallAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's WallAttention: q/k/v projections, g = logsigmoid(g_proj x) (gs likewise), RMS GroupNorm on q/k
    (per-channel gains), naive_wall_attn (window, scalar gate), sigmoid output gate, o_proj."""
    q, k, v = (x @ layer.qkv_proj.weight.T).split(layer.widths, dim=-1)
    g = F.logsigmoid(layer.g_proj(x))
    gs = None if layer.gs_proj is None else F.logsigmoid(layer.gs_proj(x))
    if layer.q_norm_weight is not None:

        def group_rms(t, w):
            t = t.unflatten(-1, (-1, layer.head_dim))
            return (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + layer.norm_eps)).flatten(-2) * w

        q, k = group_rms(q, layer.q_norm_weight), group_rms(k, layer.k_norm_weight)
    q, k, v, g = (t.unflatten(-1, (-1, layer.head_dim)) for t in (q, k, v, g))
    o = naive_wall()(q, k, v, g, scale=layer.head_dim**-0.5, window_size=layer.window_size, g_scalar=gs)
    o = o.double().flatten(-2)
    if layer.o_gate_proj is not None:
        o = torch.sigmoid(layer.o_gate_proj(x)) * o
    return o @ layer.out_proj.weight.T


# every option off its default: grouped heads, a window, the scalar gate, q/k norms, the output gate
OPTIONS = (
    "mixin.qk_norm=true",
    "mixin.num_kv_heads=2",
    "mixin.window_size=6",
    "mixin.use_output_gate=true",
    "mixin.use_scalar_gate=true",
)


@pytest.mark.parametrize("overrides", [(), OPTIONS])
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer, _ = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    params = [x, layer.qkv_proj.weight, layer.g_proj.weight] + ([layer.gs_proj.bias] if layer.gs_proj else [])
    upstream = torch.randn_like(y)
    mine = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", [1, 6, 11])
@pytest.mark.parametrize(
    "overrides",
    [
        ("positional=rope", "mixin.use_scalar_gate=true"),
        ("positional=rope", "mixin.window_size=5", "mixin.num_kv_heads=1"),
    ],
)
def test_prefill_then_decode_equals_full(prefill: int, overrides: tuple[str, ...]) -> None:
    layer, scheme = build(*overrides)
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
    layer, _ = build(*OPTIONS)  # the registry's padding suite runs the defaults
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    alone, _ = layer(x, ctx(0, 9))
    padded = torch.cat([100 * torch.randn(1, 3, HIDDEN, dtype=torch.float64), x], 1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 9])
    out, _ = layer(padded, ctx(0, 12, pad_mask=pad_mask))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-10, atol=1e-12)


def test_bad_options_gate_init_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="window_size"):
        WallAttention(HIDDEN, 0, window_size=0)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        WallAttention(HIDDEN, 0, num_kv_heads=3)
    layer = WallAttention(HIDDEN, 0, use_scalar_gate=True, gate_init_bias=5.0)
    assert all(torch.all(b == 5.0) for b in (layer.g_proj.bias, layer.gs_proj.bias))
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,scalar", [(None, False), (64, True)])
def test_fused_matches_reference_on_gpu(window: int | None, scalar: bool) -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = WallAttention(
        256, 0, num_heads=4, num_kv_heads=2, window_size=window, use_scalar_gate=scalar, gate_init_bias=2.0,
        backend="fused",
    ).cuda()  # fmt: skip
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.qkv_proj.weight, layer.g_proj.weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2

"""BitAttention: the straight-through BitNet quantiser == its formulas written out here (forward values,
ternary weights, 8-bit activation levels; gradients through the identity); the layer == BitLinear
projections + softmax attention query by query; both attention backends agree; KV-cache decoding == the
full forward; a left-padded row == the row alone; fused == reference on GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.bitattn import BitAttention
from archifactory.model.mixins.reference.bitlinear import bit_linear
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import relative_error

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=bitattn", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> BitAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def quantised_by_hand(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, eps: float):
    """fla's BitLinear forward, spelled out: (the 8-bit activations, the ternary weights)."""
    normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g
    a_scale = 127.0 / torch.clamp(normed.abs().max(-1, keepdim=True).values, min=1e-5)
    acts = torch.clamp(torch.round(normed * a_scale), -128, 127) / a_scale
    w_scale = 1.0 / torch.clamp(w.abs().mean(), min=1e-5)
    weights = torch.clamp(torch.round(w * w_scale), -1, 1) / w_scale
    return normed, acts, weights, a_scale, w_scale


def test_bit_linear_matches_the_formulas_and_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.1 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    y = bit_linear(x, w, g, 1e-8)
    normed, acts, weights, a_scale, w_scale = quantised_by_hand(x, w, g, 1e-8)
    torch.testing.assert_close(y, acts.detach() @ weights.detach().T, rtol=1e-12, atol=1e-12)
    levels = (weights * w_scale).detach()
    assert set(levels.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(levels, levels.round())
    codes = (acts * a_scale).detach()
    torch.testing.assert_close(codes, codes.round())
    torch.testing.assert_close(codes.abs().amax(-1), torch.full_like(codes[..., 0], 127.0))  # absmax
    # straight through: dL/dW = upstream^T · Q_a(x), dL/d(normed) = upstream · Q_w(W), then RMSNorm's backward
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), [x, w, g])
    grad_w = torch.einsum("bto,bti->oi", upstream, acts.detach())
    grad_normed = upstream @ weights.detach()
    grad_x, grad_g = torch.autograd.grad(normed, [x, g], grad_normed)
    for ours, expected in zip(grads, (grad_x, grad_w, grad_g)):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def layer_by_hand(layer: BitAttention, x: torch.Tensor) -> torch.Tensor:
    """The BitLinear projections spelled out, then causal softmax attention one query at a time."""

    def project(name: str, inp: torch.Tensor) -> torch.Tensor:
        proj, gain = getattr(layer, f"{name}_proj"), getattr(layer, f"{name}_norm_weight")
        _, acts, weights, _, _ = quantised_by_hand(inp, proj.weight, gain, proj.eps)
        return acts @ weights.T

    batch, seq_len, _ = x.shape
    d, groups = layer.head_dim, layer.num_heads // layer.num_kv_heads
    q = project("q", x).view(batch, seq_len, layer.num_heads, d)
    k = project("k", x).view(batch, seq_len, layer.num_kv_heads, d).repeat_interleave(groups, 2)
    v = project("v", x).view(batch, seq_len, layer.num_kv_heads, d).repeat_interleave(groups, 2)
    outputs = []
    for t in range(seq_len):
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / d**0.5
        outputs.append(torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, : t + 1]))
    y = torch.stack(outputs, 1).reshape(batch, seq_len, HIDDEN)
    return project("out", y)


@pytest.mark.parametrize("overrides", [("mixin.backend=reference",), ("mixin.num_kv_heads=2",)])
def test_layer_matches_the_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y, _ = layer(x, ctx(0, 13))
    torch.testing.assert_close(y, layer_by_hand(layer, x), rtol=1e-9, atol=1e-11)


def test_attention_backends_agree_in_outputs_and_gradients() -> None:
    layer = build("mixin.num_kv_heads=2")
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("reference", "sdpa"):
        layer.backend = backend
        y, _ = layer(x, ctx(0, 11))
        results.append((y, torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])))
    (y_r, g_r), (y_s, g_s) = results
    torch.testing.assert_close(y_s, y_r, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_s, g_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("prefill", [1, 6])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    """Grouped heads (the registry's contract suite decodes the default, one key head per query head)."""
    layer = build("mixin.num_kv_heads=2")
    x = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 12))
    state = layer.init_state(2, x.device, x.dtype)
    pieces = []
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces.append(out)
    for t in range(prefill, 12):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(12)


def test_left_padded_row_equals_the_row_alone() -> None:
    layer = build("mixin.num_kv_heads=2")
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    alone, _ = layer(x, ctx(0, 9))
    padded = torch.cat([torch.randn(1, 3, HIDDEN, dtype=torch.float64), x], 1)
    out, _ = layer(padded, ctx(0, 12, torch.tensor([[False] * 3 + [True] * 9])))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-12, atol=1e-12)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        BitAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ArchiFactoryError, match="backend"):
        BitAttention(HIDDEN, 0, backend="triton")
    layer = BitAttention(HIDDEN, 0)
    assert layer.backend_name() == "sdpa"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_matches_reference_on_gpu(autocast: bool) -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = BitAttention(256, 0, num_heads=4, num_kv_heads=2).cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "sdpa"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.q_proj.weight, layer.out_norm_weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["sdpa"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2

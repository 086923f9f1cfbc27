"""Raven: fla has no naive Raven, so the layer is held to fla's `Raven` written out here around a
token-by-token gated-slot recurrence (itself checked against fla's naive recurrent GSA): outputs,
gradients and the final slot banks, with both decay types, both router scores, the selection bias,
grouped heads and the output gate, at odd lengths across chunk boundaries; decoding == the full forward
with the GLA decay; Gumbel noise only in training; fused == reference on GPU. (Padding: the registry's
tests/model/test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.raven import Raven
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=raven", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> Raven:
    cfg = compose("mixin.chunk_size=4", "mixin.topk=3", *overrides)
    layer = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=0).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        layer.proj.weight.mul_(4.0)  # strong gates and sharp routers
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def recurrent_gsa(q, k, v, s, g, keys, values):
    """Token by token, scale 1: H^k = H^k diag(α) + k sᵀ, p = softmax(qᵀH^k), H^v = diag(α) H^v + s vᵀ,
    o = H^vᵀ p; q/k [B, T, H, K], v [B, T, H, V], s/g [B, T, H, M]."""
    outputs = []
    for t in range(q.shape[1]):
        alpha = g[:, t].exp()
        keys = keys * alpha[..., None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
        read = (q[:, t, :, :, None] * keys).sum(-2).softmax(-1)
        values = alpha[..., None] * values + s[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append((read[..., None] * values).sum(-2))
    return torch.stack(outputs, 1), keys, values


def test_recurrence_is_fla_naive_gsa() -> None:
    naive = load_fla_naive("gsa").naive_recurrent_gsa
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 3, 5), torch.randn(2, 9, 3, 5), torch.randn(2, 9, 3, 4)
    g = -torch.rand(2, 9, 3, 6)
    s = 1 - g.exp()
    theirs, (hk, hv) = naive(q, k, v, s, g, scale=1.0, output_final_state=True)
    ours, keys, values = recurrent_gsa(q, k, v, s, g, torch.zeros(2, 3, 5, 6), torch.zeros(2, 3, 6, 4))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys, hk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, hv, rtol=1e-5, atol=1e-6)


def fla_layer_by_hand(layer: Raven, x: torch.Tensor):
    """fla's Raven.forward (no rope, no Gumbel noise): projections, the decay (Mamba2: per head, GLA: per
    slot), feature map then per-head RMSNorm on q and k, SiLU on v, the router's top-k weights scattered
    onto the slots, log α = f ⊙ weights, s = 1 − α, the GSA recurrence, SiLU, the output norm (gated per
    head with the output gate, else over the width), o_proj. Returns (y, H^k, H^v)."""
    batch, seq_len, _ = x.shape
    heads, kv, slots = layer.num_heads, layer.num_kv_heads, layer.num_slots
    q, k, v, router, decay = (x @ layer.proj.weight.T).split(layer.widths, dim=-1)
    q, k = F.silu(q).view(batch, seq_len, heads, -1), F.silu(k).view(batch, seq_len, kv, -1)
    v, router = F.silu(v).view(batch, seq_len, kv, -1), router.view(batch, seq_len, kv, slots)
    if layer.decay_type == "Mamba2":
        f = (-layer.A_log.exp() * F.softplus(decay + layer.dt_bias))[..., None]
    else:
        f = F.logsigmoid(decay.view(batch, seq_len, kv, slots)) / layer.normalizer

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * w

    q, k = rms(q, layer.q_norm_weight), rms(k, layer.k_norm_weight)
    scores = torch.sigmoid(router) if layer.router_score == "sigmoid" else torch.softmax(router, -1)
    biased = scores if layer.r_bias is None else scores + layer.r_bias
    index = biased.topk(layer.topk, dim=-1).indices
    weights = torch.gather(scores, -1, index)
    if layer.router_score == "sigmoid":
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-9)
    f = f * torch.zeros_like(router).scatter_(-1, index, weights)
    s = 1 - f.exp()
    group = heads // kv
    k, v, f, s = (t.repeat_interleave(group, dim=2) for t in (k, v, f, s))
    keys = x.new_zeros(batch, heads, layer.head_k_dim, slots)
    values = x.new_zeros(batch, heads, slots, layer.head_v_dim)
    o, keys, values = recurrent_gsa(q, k, v, s, f, keys, values)
    o = F.silu(o)
    if layer.o_gate_proj is None:
        o = rms(o.flatten(2), layer.norm_weight)
    else:
        o = (rms(o, layer.norm_weight) * F.silu(layer.o_gate_proj(x).view(o.shape))).flatten(2)
    return o @ layer.out_proj.weight.T, keys, values


# the per-channel decay, the softmax router and grouped heads (the registry suites run the defaults)
GLA = ("mixin.decay_type=GLA", "mixin.router_score=softmax", "mixin.num_kv_heads=2")


@pytest.mark.parametrize(
    "seq_len,overrides",
    [
        (19, ()),
        (13, GLA),
        (
            11,
            ("mixin.bias_rmm=true", "mixin.use_output_gate=true", "mixin.num_slots=6", "mixin.chunk_size=5"),
        ),
    ],
)
def test_layer_matches_fla_layer_by_hand(seq_len: int, overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, state = layer(x, ctx(0, seq_len), layer.init_state(2, x.device, x.dtype))
    expected, keys, values = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["keys"], keys, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["values"], values, rtol=1e-10, atol=1e-12)
    y, _ = layer(x, ctx(0, seq_len))
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params, allow_unused=True)
    theirs = torch.autograd.grad((expected * upstream).sum(), params, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefill", [1, 6, 13])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build(*GLA)
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


def test_gumbel_noise_only_in_training() -> None:
    layer = build("mixin.add_gumbel_noise=true")
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    first, _ = layer(x, ctx(0, 9))
    second, _ = layer(x, ctx(0, 9))
    assert not torch.allclose(first, second)  # noisy routes in training
    layer.eval()
    first, _ = layer(x, ctx(0, 9))
    torch.testing.assert_close(layer(x, ctx(0, 9))[0], first, rtol=0, atol=0)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="decay_type"):
        Raven(HIDDEN, 0, decay_type="RWKV")
    with pytest.raises(ArchiFactoryError, match="topk"):
        Raven(HIDDEN, 0, num_slots=4, topk=5)
    assert Raven(HIDDEN, 0, num_heads=4).topk == 8  # fla: topk capped at the default M = head_k_dim
    layer = Raven(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Raven(256, 0, num_heads=4, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.proj.weight, layer.A_log], 2e-2, 5e-2)

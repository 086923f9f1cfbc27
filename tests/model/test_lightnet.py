"""LightNet: the chunked reference == a token-by-token recurrence written here (fla has no naive LightNet;
its `chunk_lightnet` is `fused_additive_gate` + `chunk_gla`, so the recurrence is also run as fla's naive
GLA on that gate) — outputs, final state, gradients, at odd lengths across chunk boundaries and from a
prefix's state; the layer == fla's LightNetAttention written out; fused == reference on GPU. (Decoding and
padding: the registry suites, tests/model/test_contract*.py and test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.lightnet import LightNetAttention
from archifactory.model.mixins.reference.lightnet import empty_state, lightnet_forward
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=lightnet", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> LightNetAttention:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def recurrent_lightnet(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Token by token from the empty state: z = logaddexp(z, k_t); S = exp(z_old − z) S + exp(k_t − z) v_tᵀ;
    o_t = S_tᵀ q_t / √K. Returns (o [B, T, H, V], S_T, z_T)."""
    batch, seq_len, heads, key_dim = q.shape
    memory = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    z = q.new_full((batch, heads, key_dim), float("-inf"))
    outputs = []
    for t in range(seq_len):
        z_new = torch.logaddexp(z, k[:, t])
        memory = (z - z_new).exp()[..., None] * memory + (k[:, t] - z_new).exp()[..., None] * v[:, t, :, None]
        z = z_new
        outputs.append((q[:, t, :, :, None] * memory).sum(-2) * key_dim**-0.5)
    return torch.stack(outputs, 1), memory, z


def inputs(seq_len: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, seq_len, 3, width, dtype=torch.float64) for width in (8, 8, 6))
    return [t.requires_grad_() for t in (q, 3 * k, v)]  # wide key logits: sharp normalisers


@pytest.mark.parametrize("seq_len,chunk", [(19, 4), (13, 5), (7, 16)])
def test_reference_matches_the_recurrence(seq_len: int, chunk: int) -> None:
    q, k, v = inputs(seq_len)
    ours, _ = lightnet_forward(q, k, v, None, "reference", chunk)
    theirs, _, _ = recurrent_lightnet(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v]) for o in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_recurrence_is_fla_naive_gla_on_the_additive_gate() -> None:
    """The recurrence above == fla's naive GLA fed the normalised keys exp(k − z) and the log-decays
    z_{t−1} − z_t (0 at the first step), as `chunk_lightnet` feeds `chunk_gla`."""
    naive = load_fla_naive("gla").naive_recurrent_gla
    q, k, v = (t.detach().float() for t in inputs(11))
    z = k.logcumsumexp(1)
    gate = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1] - z[:, 1:]], dim=1)
    theirs, _ = naive(q, (k - z).exp(), v, gate)
    ours, _, _ = recurrent_lightnet(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix,chunk", [(1, 4), (6, 5), (12, 16)])
def test_state_continues_the_recurrence(prefix: int, chunk: int) -> None:
    q, k, v = (t.detach() for t in inputs(17))
    theirs, memory, z = recurrent_lightnet(q, k, v)
    state = empty_state(q, v)
    first, state = lightnet_forward(q[:, :prefix], k[:, :prefix], v[:, :prefix], state, "reference", chunk)
    rest, state = lightnet_forward(q[:, prefix:], k[:, prefix:], v[:, prefix:], state, "reference", chunk)
    torch.testing.assert_close(torch.cat([first, rest], 1), theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0], memory, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[1], z, rtol=1e-12, atol=1e-12)


def fla_layer_by_hand(layer: LightNetAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's layer: q/k/v projections, SiLU on q, the recurrence, then rms_norm_swish_gate_linear: an
    RMSNorm over the whole width (eps 1e-6) times swish(g_proj x) (low rank), then o_proj."""
    batch, seq_len, _ = x.shape
    q, k, v = (x @ layer.proj.weight.T).split(layer.widths, dim=-1)
    q, k, v = (t.view(batch, seq_len, layer.num_heads, -1) for t in (F.silu(q), k, v))
    o, _, _ = recurrent_lightnet(q, k, v)
    o = o.flatten(-2)
    g = x @ layer.gate_down.weight.T @ layer.gate_up.weight.T
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm_weight
    return (normed * F.silu(g)) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides", [("mixin.chunk_size=4",), ("mixin.chunk_size=5", "mixin.expand_ratio=6")]
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, layer.proj.weight, layer.gate_down.weight, layer.norm_weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="expand_ratio"):
        LightNetAttention(HIDDEN, 0, expand_ratio=0)
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        LightNetAttention(HIDDEN, 0, num_heads=5)
    assert LightNetAttention(HIDDEN, 0, expand_ratio=None).head_k_dim == HIDDEN // 4
    layer = LightNetAttention(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = LightNetAttention(256, 0, num_heads=4, expand_ratio=64, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.proj.weight], 2e-2, 5e-2)

"""Rodimus: fla has no naive Rodimus, so the layer is held to fla's RodimusAttention written out here
around a token-by-token GLA recurrence (outputs, gradients, final state), with small chunks so odd lengths
cross chunk boundaries (and one shorter than a chunk); the recurrence is fla's naive GLA; fused ==
reference on GPU. (Decoding and padding at the default options: the registry suites.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.rodimus import Rodimus
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import relative_error

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(["mixin=rodimus", "positional=none", f"model.hidden_size={HIDDEN}", *overrides])


def build(*overrides: str) -> Rodimus:
    layer = component_factory("mixin", compose(*overrides).mixin, HIDDEN)(layer_idx=0).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def recurrent_gla(q, k, v, g, state):
    """S_t = diag(exp g_t) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √K, token by token; q/k/g [B, T, K],
    v [B, T, V], state [B, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        state = g[:, t].exp()[..., None] * state + k[:, t, :, None] * v[:, t, None, :]
        outputs.append((q[:, t, :, None] * state).sum(-2) * q.shape[-1] ** -0.5)
    return torch.stack(outputs, 1), state


def test_recurrence_is_fla_naive_gla() -> None:
    naive = load_fla_naive("gla").naive_recurrent_gla
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 1, 6), torch.randn(2, 9, 1, 6)
    v, g = torch.randn(2, 9, 1, 5), -torch.rand(2, 9, 1, 6)
    theirs, final = naive(q, k, v, g, output_final_state=True)
    ours, state = recurrent_gla(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], torch.zeros(2, 6, 5))
    torch.testing.assert_close(ours, theirs[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, final[:, 0], rtol=1e-5, atol=1e-6)


def fla_layer_by_hand(layer: Rodimus, x: torch.Tensor, state: torch.Tensor | None = None):
    """fla's RodimusAttention.forward: up/gate projections, SiLU short conv (with bias) on the up branch,
    q/k/gates from the conv output, v = sigmoid(low-rank gate of u) ⊙ u, k = normalize(k) ⊙ softplus(g)^τ,
    log-decay −τ·softplus(g), the GLA recurrence, + residual_weight ⊙ conv output, RMSNormGated(norm
    after the SiLU gate), down_proj. Returns (y, the final recurrent state)."""
    batch, seq_len, _ = x.shape
    d, m = layer.inner, layer.mem_size
    up_w, gate_w = layer.in_proj.weight.split(d, dim=0)
    u, z = x @ up_w.T, x @ gate_w.T
    kernel = layer.conv.weight[:, 0]  # [d, K]
    width = kernel.shape[1]
    padded = F.pad(u, (0, 0, width - 1, 0))
    conv = sum(padded[:, i : i + seq_len] * kernel[:, i] for i in range(width)) + layer.conv.bias
    shifted = F.silu(conv)
    q_w, k_w = layer.qk_proj.weight.split(m, dim=0)
    g_w, tau_w = layer.decay_proj.weight.split(m, dim=0)
    g_b, tau_b = layer.decay_proj.bias.split(m)
    q, k = shifted @ q_w.T, shifted @ k_w.T
    v = torch.sigmoid(u @ layer.i_gate_down.weight.T @ layer.i_gate_up.weight.T + layer.i_gate_up.bias) * u
    g = F.softplus(shifted @ g_w.T + g_b)
    tau = torch.sigmoid(shifted @ tau_w.T + tau_b)
    k = F.normalize(k, dim=-1, eps=1e-12) * g**tau
    state = x.new_zeros(batch, m, d) if state is None else state
    o, state = recurrent_gla(q, k, v, -g * tau, state)
    o = (o + shifted * layer.residual_weight) * F.silu(z)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight
    return o @ layer.out_proj.weight.T, state


@pytest.mark.parametrize(
    "seq_len,overrides",
    [
        (19, ("mixin.chunk_size=4",)),
        (13, ("mixin.chunk_size=5", "mixin.expand_ratio=6")),
        (3, ("mixin.chunk_size=4",)),
    ],
)
def test_layer_matches_fla_layer_by_hand(seq_len: int, overrides: tuple[str, ...]) -> None:
    layer = build("mixin.expand_ratio=8", *overrides)
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, state = layer(x, ctx(0, seq_len), layer.init_state(2, x.device, x.dtype))
    expected, final = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["recurrent"][:, 0], final, rtol=1e-10, atol=1e-12)
    y, _ = layer(x, ctx(0, seq_len))  # the training path
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_options_bad_values_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="expand_ratio"):
        Rodimus(HIDDEN, 0, expand_ratio=0)
    layer = Rodimus(100, 0)
    assert layer.inner == 200 and layer.i_gate_down.out_features == 16  # fla: align 2·100 to 8; rank 16
    assert Rodimus(36, 0).inner == 72 and Rodimus(1280, 0).i_gate_down.out_features == 20
    assert Rodimus(HIDDEN, 0, use_short_conv=False).init_state(
        1, torch.device("cpu"), torch.float32
    ).keys() == {"recurrent"}
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, 100), PositionContext(NoPositional(100, 8), 0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Rodimus(256, 0, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.in_proj.weight, layer.decay_proj.bias]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2

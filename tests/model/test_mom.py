"""MoM: fla has no naive MoM, so the layer is held to fla's `MomAttention` written out here with Python
loops — each memory's routed tokens gathered in order, its short conv and a token-by-token gated delta
rule run over them alone, the outputs put back and mixed by the routing weights — outputs, gradients and
every memory's final state and conv buffer, at odd lengths across chunk boundaries and from a warm state;
fused == reference on GPU. (Decoding and padding: the registry suites, tests/model/test_contract*.py and
test_padding_mixins.py.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.mom import MixtureOfMemories
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=mom", "positional=none", f"model.hidden_size={HIDDEN}", "model.num_heads=2", *overrides]
    )


def build(*overrides: str) -> MixtureOfMemories:
    cfg = compose("mixin.chunk_size=4", "mixin.num_memories=4", *overrides)
    layer = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=0).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        layer.memory_weight.mul_(20.0)
        layer.router.weight.mul_(20.0)  # uneven routes
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """fla's `l2norm` (use_qk_l2norm_in_kernel): t / sqrt(Σt² + 1e-6)."""
    return t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)


def layer_by_hand(layer: MixtureOfMemories, x: torch.Tensor, state: dict | None = None):
    """fla's MomAttention.forward (eval semantics), one row and one memory at a time."""
    batch, seq_len, _ = x.shape
    heads, dk, dv, kernel = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.conv.kernel_size
    scores = torch.softmax(x @ layer.router.weight.T, -1)
    top_w, top_i = scores.topk(layer.topk, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    if state is None:
        state = layer.init_state(batch, x.device, x.dtype)
    y = x.new_zeros(batch, seq_len, heads, dv)
    final_s, final_conv = state["recurrent"].clone(), state["conv"].clone()
    for row in range(batch):
        for e in range(layer.num_memories):
            tokens = [t for t in range(seq_len) if e in top_i[row, t].tolist()]
            w_k, w_v, w_b, w_a = layer.memory_weight[e].split(layer.widths, dim=0)
            h = x[row, tokens]  # [n, D]: only this memory's tokens, in order
            raw = torch.cat([h @ layer.q_proj.weight.T, h @ w_k.T, h @ w_v.T], -1)  # [n, C]
            history = torch.cat([state["conv"][row, e].T, raw], 0)  # [K − 1 + n, C]
            conv = [
                F.silu((history[j : j + kernel] * layer.conv.weight[:, 0].T).sum(0))
                for j in range(len(tokens))
            ]
            final_conv[row, e] = history[len(tokens) :].T
            s = state["recurrent"][row, e].clone()
            for j, t in enumerate(tokens):
                q, k, v = conv[j].split([layer.key_dim, layer.key_dim, layer.value_dim])
                q, k = l2norm(q.view(heads, dk)), l2norm(k.view(heads, dk))
                v = v.view(heads, dv)
                beta = torch.sigmoid(x[row, t] @ w_b.T)
                g = -layer.A_log.exp() * F.softplus(x[row, t] @ w_a.T + layer.dt_bias)
                s = g.exp()[:, None, None] * s
                s = s + beta[:, None, None] * k[:, :, None] * (v - (k[:, :, None] * s).sum(1))[:, None, :]
                o = (q[:, :, None] * s).sum(1) * dk**-0.5
                weight = top_w[row, t][top_i[row, t] == e].sum()
                y[row, t] = y[row, t] + weight * o
            final_s[row, e] = s
    gate = (x @ layer.g_proj.weight.T).view(batch, seq_len, heads, dv)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * layer.norm_weight * F.silu(gate)
    return y.flatten(2) @ layer.out_proj.weight.T, final_s, final_conv


def warm_state(layer: MixtureOfMemories, batch: int) -> dict:
    torch.manual_seed(5)
    return {key: torch.randn_like(t) for key, t in layer.init_state(batch, "cpu", torch.float64).items()}


@pytest.mark.parametrize(
    "seq_len,overrides,warm", [(19, (), False), (13, ("mixin.topk=1",), True), (2, (), True)]
)
def test_layer_matches_fla_layer_by_hand(seq_len: int, overrides: tuple[str, ...], warm: bool) -> None:
    layer = build(*overrides)
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64, requires_grad=True)
    start = warm_state(layer, 2) if warm else layer.init_state(2, x.device, x.dtype)
    y, state = layer(x, ctx(0, seq_len), start)
    expected, final_s, final_conv = layer_by_hand(layer, x, start)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["recurrent"], final_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["conv"], final_conv, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="topk"):
        MixtureOfMemories(HIDDEN, 0, num_memories=2, topk=3)
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        MixtureOfMemories(HIDDEN, 0, num_heads=5)
    assert MixtureOfMemories(HIDDEN, 0, num_heads=2, head_dim=8).head_v_dim == 16
    layer = MixtureOfMemories(HIDDEN, 0)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = MixtureOfMemories(256, 0, num_heads=4, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.memory_weight, layer.A_log], 2e-2, 5e-2)

"""Lightning Attention: the layer == MiniMax-01's layer written out around fla's naive simple-GLA oracle with
the constant per-head decay (outputs, final state, gradients; odd lengths across chunk boundaries, from a warm
state); the two slope schedules by hand; the model hands the layer its depth; fused == reference (and == fla's
`chunk_lightning_attn`) on GPU. Decode == forward and padding are the registry suites' (contract, padding)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.build import build_model
from archifactory.model.components import component_factory
from archifactory.model.mixins.lightning_attn import LightningAttention, lightning_log_decay
from archifactory.model.mixins.reference.simple_gla import simple_gla_forward
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import assert_fused_matches_reference, relative_error

HIDDEN, HEADS = 32, 4
CPU = torch.device("cpu")


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=lightning_attn", "positional=none", f"model.hidden_size={HIDDEN}", f"model.num_heads={HEADS}"]
        + list(overrides)
    )


def build(*overrides: str, layer_idx: int = 1, num_layers: int | None = 4) -> LightningAttention:
    factory = component_factory("mixin", compose(*overrides).mixin, HIDDEN, num_layers)
    layer = factory(layer_idx=layer_idx)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length)


def minimax_layer_by_hand(layer: LightningAttention, x: torch.Tensor, state: torch.Tensor | None):
    """MiniMax-01's lightning layer: SiLU(qkv_proj x) split per head into q, k, v; o_t = q_t S_t with
    S_t = exp(−s_h) S_{t−1} + k_tᵀ v_t (fla's naive recurrent simple GLA, scale 1); RMSNorm over the width
    (eps 1e-6); times sigmoid(output_gate x); out_proj. Returns (y, final S)."""
    naive = load_fla_naive("simple_gla").naive_recurrent_simple_gla
    batch, seq_len, _ = x.shape
    qkv = F.silu(x @ layer.qkv_proj.weight.T).view(batch, seq_len, HEADS, -1)
    q, k, v = qkv.chunk(3, dim=-1)
    g = layer.log_decay(x.device, x.dtype).expand(batch, seq_len, HEADS)
    o, final = naive(q, k, v, g, scale=1.0, initial_state=state, output_final_state=True)
    o = o.flatten(-2)
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm_weight
    return (torch.sigmoid(x @ layer.output_gate.weight.T) * normed) @ layer.out_proj.weight.T, final


@pytest.mark.parametrize("seq_len,chunk,warm", [(13, 4, False), (19, 5, True), (7, 16, True)])
def test_layer_matches_minimax_layer_on_fla_naive(seq_len: int, chunk: int, warm: bool) -> None:
    torch.manual_seed(0)
    layer = build(f"mixin.chunk_size={chunk}")
    x = torch.randn(2, seq_len, HIDDEN, requires_grad=True)
    state = layer.init_state(2, CPU, x.dtype)
    if warm:
        state["recurrent"] = torch.randn_like(state["recurrent"])
    y, new = layer(x, ctx(0, seq_len), {"recurrent": state["recurrent"].clone()})
    expected, final = minimax_layer_by_hand(layer, x, state["recurrent"].clone())
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new["recurrent"], final, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(y)
    params = [x, layer.qkv_proj.weight, layer.output_gate.weight, layer.norm_weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_minimax_slopes_by_hand() -> None:
    """ALiBi's slopes (H = 4: 2^-2, 2^-4, 2^-6, 2^-8) times 1 − l/(L − 1 + 1e-5) + 1e-5."""
    alibi = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], dtype=torch.float64)
    for layer_idx, num_layers in [(0, 4), (2, 4), (3, 4), (0, 1), (5, 12)]:
        depth = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
        got = lightning_log_decay(4, layer_idx, num_layers, "minimax", CPU, torch.float64)
        torch.testing.assert_close(got, -depth * alibi, rtol=1e-12, atol=0)
    last = lightning_log_decay(4, 3, 4, "minimax", CPU, torch.float64)
    assert (last < 0).all() and (last > -1e-4).all()  # the last layer barely decays
    torch.testing.assert_close(lightning_log_decay(4, 2, None, "minimax", CPU, torch.float64), -alibi)


def test_fla_slopes_by_hand() -> None:
    """fla 0.6.0's chunk_lightning_attn: g_gamma = −(8/H · (1 − l/L)) · h."""
    for layer_idx, num_layers, heads in [(0, 4, 4), (3, 4, 4), (2, 6, 8)]:
        expected = [-(8 / heads * (1 - layer_idx / num_layers)) * h for h in range(heads)]
        got = lightning_log_decay(heads, layer_idx, num_layers, "fla", CPU, torch.float64)
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert math.isclose(lightning_log_decay(4, 1, None, "fla", CPU, torch.float64)[1].item(), -2.0)


def test_the_model_hands_each_layer_its_depth() -> None:
    cfg = compose_config(
        ["mixin=lightning_attn", "model.hidden_size=32", "model.num_heads=4", "model.num_layers=3"]
    )
    model = build_model(cfg, 100)
    decays = [block.mixin.log_decay(CPU, torch.float64) for block in model.blocks]
    for layer_idx, decay in enumerate(decays):
        assert model.blocks[layer_idx].mixin.num_layers == 3
        torch.testing.assert_close(decay, lightning_log_decay(4, layer_idx, 3, "minimax", CPU, torch.float64))
    assert (decays[0] < decays[1]).all() and (decays[1] < decays[2]).all()  # deeper layers decay less


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="slopes"):
        LightningAttention(HIDDEN, 0, slopes="alibi")
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        LightningAttention(HIDDEN, 0, num_heads=5)
    with pytest.raises(ArchiFactoryError, match="chunk_size"):
        LightningAttention(HIDDEN, 0, chunk_size=0)
    layer = LightningAttention(HIDDEN, 0, head_dim=6)
    assert layer.qkv_proj.out_features == 3 * 4 * 6 and layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_and_fla_op_on_gpu() -> None:
    """bf16 autocast: the fused layer vs the reference (outputs, gradients); with slopes=fla the kernel call
    equals fla's own `chunk_lightning_attn` (which derives the same decays from layer_idx/num_layers)."""
    pytest.importorskip("fla")
    from fla.ops.lightning_attn import chunk_lightning_attn

    torch.manual_seed(0)
    layer = LightningAttention(256, 2, num_heads=4, slopes="fla", num_layers=6, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qkv_proj.weight], 2e-2, 5e-2)
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda") for _ in range(3))
    g = layer.log_decay(q.device, q.dtype).expand(2, 300, 4)
    theirs, _ = chunk_lightning_attn(q, k, v, layer_idx=2, num_layers=6, scale=1.0)
    ours, _ = simple_gla_forward(q, k, v, g, 1.0, None, "fused", 64)
    assert relative_error(ours, theirs) < 1e-3

"""linear_attention, gla, hgrn2, fox: references == token steps == fla's naive oracles; long sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.fox import ForgettingAttention
from archifactory.model.mixins.gla import HGRN2, GatedLinearAttention
from archifactory.model.mixins.linear_attention import LinearAttention
from archifactory.model.mixins.reference.gla import chunk_gla, gla_step
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import recurrent

B, H, K, V = 2, 3, 8, 6


def gla_inputs(seq_len: int, dtype=torch.float64, strength: float = 1.0):
    q, k = torch.randn(B, seq_len, H, K, dtype=dtype), torch.randn(B, seq_len, H, K, dtype=dtype)
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    g = F.logsigmoid(strength * torch.randn(B, seq_len, H, K, dtype=dtype))
    return [q, k, v, g], torch.randn(B, H, K, V, dtype=dtype)


def leaves_of(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def grads(out, state, leaves, weight):
    return torch.autograd.grad((out * weight).sum() + state.sin().sum(), leaves)


def ctx(seq_len: int, hidden: int = 32) -> PositionContext:
    return PositionContext(NoPositional(hidden, 4096), 0, seq_len)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.double()


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (9, 4), (16, 8), (29, 8), (37, 16)])
def test_chunked_gla_equals_token_steps(seq_len: int, chunk_size: int) -> None:
    inputs, state = gla_inputs(seq_len)
    ours = leaves_of([*inputs, state])
    out, final = chunk_gla(*ours[:4], None, ours[4], True, chunk_size)
    loop = leaves_of([*inputs, state])
    out_ref, final_ref = recurrent(gla_step, *loop[:4], state=loop[4])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(grads(out, final, ours, weight), grads(out_ref, final_ref, loop, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gla_matches_fla_oracle() -> None:
    """`naive_recurrent_gla`: [B, T, H, D], gk in log space, scale fixed at 1/sqrt(K); fp32; T = 37."""
    pytest.importorskip("fla")
    from fla.ops.gla.naive import naive_recurrent_gla

    inputs, state = gla_inputs(37, dtype=torch.float32)
    ours, theirs = leaves_of(inputs), leaves_of(inputs)
    out, final = chunk_gla(*ours, None, state, True, 16)
    out_ref, final_ref = naive_recurrent_gla(*theirs, initial_state=state, output_final_state=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(grads(out, final, ours, weight), grads(out_ref, final_ref, theirs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_gla_long_sequence_with_strong_decays_is_finite() -> None:
    inputs, _ = gla_inputs(4096, dtype=torch.float64, strength=30.0)  # log-decays down to about −100
    expected = chunk_gla(*inputs, chunk_size=16)[0]
    leaves = leaves_of([t.float() for t in inputs])
    out = chunk_gla(*leaves, chunk_size=16)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    out.square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_gla_layer_matches_fla_oracle() -> None:
    """The layer's decay is logsigmoid(W₂W₁x + b)/τ and its readout a per-head RMSNorm × SiLU gate."""
    pytest.importorskip("fla")
    from fla.ops.gla.naive import naive_recurrent_gla

    layer = perturbed(GatedLinearAttention(32, 0, num_heads=4, expand_k=0.5, chunk_size=4))
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q, k, v = (x @ layer.qkv_proj.weight.T).split([16, 16, 32], dim=-1)
    g = F.logsigmoid(layer.gk_proj(x)) / 16.0
    heads = (2, 13, 4, -1)
    o, _ = naive_recurrent_gla(q.view(heads), k.view(heads), v.view(heads), g.view(heads))
    o = o.double()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight
    expected = layer.out_proj(o.flatten(-2) * F.silu(layer.g_proj(x)))
    torch.testing.assert_close(layer(x, ctx(13))[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lower_bound", [0.0, 0.3])
def test_hgrn2_layer_matches_fla_gla_oracle(lower_bound: float) -> None:
    """HGRN2 is GLA with q = SiLU(q_proj x), gk = log(lb + (1 − lb)·sigmoid(f_proj x)), k = 1 − exp(gk),
    v = i_proj x (fla's HGRN2 layer calls chunk_gla the same way)."""
    pytest.importorskip("fla")
    from fla.ops.gla.naive import naive_recurrent_gla

    layer = perturbed(HGRN2(32, 0, num_heads=4, expand_ratio=6, lower_bound=lower_bound, chunk_size=4))
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q, f = (x @ layer.qf_proj.weight.T).split([24, 24], dim=-1)
    gk = torch.log(lower_bound + (1 - lower_bound) * torch.sigmoid(f))
    heads = (2, 13, 4, -1)
    o, _ = naive_recurrent_gla(
        F.silu(q).view(heads), (1 - gk.exp()).view(heads), layer.i_proj(x).view(heads), gk.view(heads)
    )
    o = o.double().flatten(-2)
    expected = layer.out_proj(o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight)
    torch.testing.assert_close(layer(x, ctx(13))[0], expected, rtol=1e-4, atol=1e-5)


# the identity map with the normaliser is left out: φ(q)·z changes sign there, so the ratio is ill-posed
@pytest.mark.parametrize(
    "feature_map,normalize",
    [("elu", True), ("elu", False), ("relu", True), ("relu", False), ("identity", False)],
)
def test_linear_attention_matches_fla_oracle(feature_map: str, normalize: bool) -> None:
    pytest.importorskip("fla")
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    layer = perturbed(
        LinearAttention(32, 0, num_heads=4, feature_map=feature_map, normalize=normalize, chunk_size=4)
    )
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q, k, v = (x @ layer.qkv_proj.weight.T).split([32, 32, 32], dim=-1)
    phi = {"elu": lambda t: F.elu(t) + 1, "relu": F.relu, "identity": lambda t: t}[feature_map]
    heads = (2, 13, 4, -1)
    o, _ = naive_recurrent_linear_attn(
        phi(q).view(heads), phi(k).view(heads), v.view(heads), normalize=normalize
    )
    expected = layer.out_proj(o.double().flatten(-2))
    torch.testing.assert_close(layer(x, ctx(13))[0], expected, rtol=1e-4, atol=1e-5)


def test_fox_matches_fla_oracle_and_its_own_definition() -> None:
    """`naive_forgetting_attn(q, k, v, g)`: softmax over j <= i of q·k/sqrt(d) + Σ_{l=j+1..i} g_l."""
    pytest.importorskip("fla")
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn

    for backend in ("sdpa", "reference"):
        layer = perturbed(ForgettingAttention(32, 0, num_heads=4, num_kv_heads=2, backend=backend))
        x = torch.randn(2, 13, 32, dtype=torch.float64)
        q, k, v = (x @ layer.qkv_proj.weight.T).split([32, 16, 16], dim=-1)
        g = F.logsigmoid(layer.f_proj(x))  # [B, T, H]
        o = naive_forgetting_attn(q.view(2, 13, 4, 8), k.view(2, 13, 2, 8), v.view(2, 13, 2, 8), g)
        expected = layer.out_proj(o.double().flatten(-2))
        torch.testing.assert_close(layer(x, ctx(13))[0], expected, rtol=1e-4, atol=1e-5)


def test_fox_with_gates_open_is_softmax_attention() -> None:
    """With f = 1 everywhere (bias → +∞ before the sigmoid) FoX is plain causal attention."""
    layer = perturbed(ForgettingAttention(32, 0, num_heads=4))
    with torch.no_grad():
        layer.f_proj.weight.zero_()
        layer.f_proj.bias.fill_(60.0)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = (x @ layer.qkv_proj.weight.T).view(2, 9, 3, 4, 8).unbind(2)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    expected = layer.out_proj(o.transpose(1, 2).flatten(-2))
    torch.testing.assert_close(layer(x, ctx(9))[0], expected, rtol=1e-8, atol=1e-10)

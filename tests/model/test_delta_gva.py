"""deltanet / gated_deltanet with grouped value heads (fla's GVA, Qwen3-Next): H key heads of an
independent size d_k, H_v = G·H value heads. The layer equals fla's layer written out by hand with fla's
naive oracle on q/k repeated per value head (key head h serves value heads h·G .. h·G + G − 1); decode
equals the full forward; accounting counts H_v states; a bad head count is one line. Padded rows:
`test_padding_mixins.py` (its GVA variants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.mixins.base import projection_flops
from archifactory.model.mixins.deltanet import DeltaNet, GatedDeltaNet
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.positional import NoPositional, PositionContext

B, T, D, H, HV, DK = 2, 19, 32, 2, 4, 12  # d_k = 12 != D / H = 16; T crosses chunks of 8
CTX = PositionContext(NoPositional(D, 64), 0, T)


def build(cls, **options):
    torch.manual_seed(0)
    layer = cls(D, 0, num_heads=H, num_v_heads=HV, head_dim=DK, chunk_size=8, **options).float()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def fla_by_hand(layer, x: torch.Tensor, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's DeltaNet / GatedDeltaNet forward from its source: q/k of H heads repeated over their value
    heads (`repeat_interleave`, as fla's kernels index key head j // G), fla's naive recurrence, the
    per-value-head RMSNorm (SiLU-gated), out_proj. Returns (y, final state [B, H_v, d_k, d_v])."""
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = qkv.split([H * DK, H * DK, layer.value_dim], dim=-1)
    group = HV // H
    q, k = (l2_normalize(t.reshape(B, T, H, DK)).repeat_interleave(group, dim=2) for t in (q, k))
    v = v.reshape(B, T, HV, -1)
    beta = layer.b_proj(x).sigmoid()
    if gated:
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

        decay = layer.head_decay
        g = -decay.A_log.exp() * F.softplus(decay.a_proj(x) + decay.dt_bias)
        o, state = naive_recurrent_gated_delta_rule(q, k, v, beta, g, output_final_state=True)
    else:
        from fla.ops.delta_rule.naive import delta_rule_recurrence

        o, state = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)))
        o = o.transpose(1, 2)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight
    if gated:
        o = o * F.silu(layer.g_proj(x).reshape(B, T, HV, -1))
    return layer.out_proj(o.reshape(B, T, -1)), state


@pytest.mark.parametrize("cls,gated", [(DeltaNet, False), (GatedDeltaNet, True)])
def test_layer_equals_fla_oracle_on_repeated_keys(cls, gated: bool) -> None:
    """Outputs, final state and gradients (input and q/k/v weights) against the oracle, fp32."""
    pytest.importorskip("fla")
    layer = build(cls)
    x = torch.randn(B, T, D)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, state = layer(ours_x, CTX, layer.init_state(B, x.device, torch.float32))
    y_ref, state_ref = fla_by_hand(layer, theirs_x, gated)
    assert state["recurrent"].shape == (B, HV, DK, layer.head_v_dim)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["recurrent"], state_ref, rtol=1e-4, atol=1e-5)
    weight = torch.randn_like(y)
    grads = [
        torch.autograd.grad((out * weight).sum() + st.sin().sum(), [xi, layer.qkv_proj.weight])
        for out, st, xi in ((y, state["recurrent"], ours_x), (y_ref, state_ref, theirs_x))
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_decode_equals_forward(cls) -> None:
    layer = build(cls).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    full, _ = layer(x, CTX)
    state = layer.init_state(B, x.device, torch.float64)
    out, state = layer(x[:, :7], PositionContext(CTX.scheme, 0, 7), state)
    outs = [out]
    for t in range(7, T):
        out, state = layer(x[:, t : t + 1], PositionContext(CTX.scheme, t, 1), state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_accounting_counts_value_heads_and_the_key_head_size(cls) -> None:
    layer = build(cls)
    state = layer.init_state(1, torch.device("cpu"), torch.float32)
    assert layer.state_size(T) == sum(t.numel() for t in state.values())
    assert state["recurrent"].shape[1:] == (HV, DK, layer.head_v_dim)
    widths = {"qkv_proj": 2 * H * DK + layer.value_dim, "b_proj": HV, "out_proj": D}
    for name, width in widths.items():
        assert getattr(layer, name).weight.shape[0] == width, name
    # the recurrence runs once per value head: beyond projections and conv, as many FLOPs as H_v key heads
    full_heads = cls(D, 0, num_heads=HV, head_dim=DK, chunk_size=8)
    rule = [
        m.flops_per_token(T) - projection_flops(m) - m.conv.flops_per_token() for m in (layer, full_heads)
    ]
    assert rule[0] == rule[1] > 0


@pytest.mark.parametrize(
    "options,fix",
    [
        ({"num_heads": 2, "num_v_heads": 3}, "pick num_v_heads among the multiples of num_heads"),
        ({"num_heads": 4, "num_v_heads": 2}, "pick num_v_heads among the multiples of num_heads"),
        ({"num_heads": 2, "head_dim": 0}, "use a positive head_dim"),
    ],
)
def test_bad_head_options_are_one_line_naming_the_fix(options: dict, fix: str) -> None:
    for cls in (DeltaNet, GatedDeltaNet):
        with pytest.raises(ArchiFactoryError) as err:
            cls(D, 0, **options)
        assert fix in str(err.value) and "\n" not in str(err.value)

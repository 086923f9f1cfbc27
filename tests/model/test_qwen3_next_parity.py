"""gated_deltanet against transformers' Qwen3-Next GatedDeltaNet layer (its torch fallback path on CPU),
at Qwen3-Next's shape of fewer key heads than value heads (2 key heads of 12, 4 value heads of 24, as
its 16 / 32 heads of 128) and its norm eps 1e-6: our weights copied into the layer's fused, per-key-head
interleaved projections give the same outputs."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.deltanet import GatedDeltaNet
from archifactory.model.positional import NoPositional, PositionContext

B, T, D, H, HV, DK = 2, 19, 32, 2, 4, 12


def qwen_layer_from(ours: GatedDeltaNet):
    """Qwen3NextGatedDeltaNet holding `ours`'s weights: in_proj_qkvz is laid out per key head h as
    [q_h, k_h, v and z of its value heads h·G .. h·G + G − 1], in_proj_ba as [β and a of those heads]."""
    modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig

    dv, group = ours.head_v_dim, HV // H
    config = Qwen3NextConfig(
        hidden_size=D, linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=DK,
        linear_value_head_dim=dv, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, hidden_act="silu",
        num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=H, num_key_value_heads=H,
    )  # fmt: skip
    theirs = modeling.Qwen3NextGatedDeltaNet(config, 0).double()
    q, k, v = ours.qkv_proj.weight.split([H * DK, H * DK, HV * dv])
    z, b, a = ours.g_proj.weight, ours.b_proj.weight, ours.head_decay.a_proj.weight
    per_head = lambda w, size: w.split(size)  # noqa: E731 - rows of key head h
    qkvz = [
        torch.cat(parts)
        for parts in zip(per_head(q, DK), per_head(k, DK), per_head(v, group * dv), per_head(z, group * dv))
    ]
    ba = [torch.cat(parts) for parts in zip(per_head(b, group), per_head(a, group))]
    with torch.no_grad():
        theirs.in_proj_qkvz.weight.copy_(torch.cat(qkvz))
        theirs.in_proj_ba.weight.copy_(torch.cat(ba))
        theirs.conv1d.weight.copy_(ours.conv.weight)
        theirs.A_log.copy_(ours.head_decay.A_log)
        theirs.dt_bias.copy_(ours.head_decay.dt_bias)
        theirs.norm.weight.copy_(ours.norm_weight)
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
    return theirs


def test_gated_deltanet_equals_qwen3_next_layer_with_fewer_key_heads() -> None:
    torch.manual_seed(0)
    ours = GatedDeltaNet(D, 0, num_heads=H, num_v_heads=HV, head_dim=DK, norm_eps=1e-6, chunk_size=8)
    ours = ours.double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = qwen_layer_from(ours)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, _ = ours(x, PositionContext(NoPositional(D, 64), 0, T))
    # the Qwen layer computes its recurrence and gated norm in fp32: fp32-level agreement
    torch.testing.assert_close(y, theirs(x), rtol=1e-4, atol=1e-5)

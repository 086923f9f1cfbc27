"""mla against transformers' DeepSeek-V3 attention layer (eager, fp64), with DeepSeek's latent-norm eps
1e-6 set through `mixin.norm_eps` (no workaround) and both of DeepSeek's rope layouts: rotate-half, and
the interleaved pairs of its released weights (our rope rows permuted on the way in)."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.mla import MultiHeadLatentAttention
from archifactory.model.positional import NoPositional, PositionContext

B, T, D, H = 2, 11, 64, 4
NOPE, ROPE, V, KV_RANK, Q_RANK = 16, 8, 16, 32, 24


def interleaved(rows: torch.Tensor) -> torch.Tensor:
    """Rope rows [d_r, ...] from the rotate-half layout (pair i = rows i and i + d_r/2) to DeepSeek's
    interleaved one (pair i = rows 2i and 2i + 1)."""
    half = rows.shape[0] // 2
    return rows[torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()]


def deepseek_from(ours: MultiHeadLatentAttention, interleave: bool):
    """DeepseekV3Attention (and its rotary tables) holding `ours`'s weights."""
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=Q_RANK,
        kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
        rms_norm_eps=1e-6, rope_interleave=interleave, num_hidden_layers=1, attention_bias=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    theirs = modeling.DeepseekV3Attention(config, 0).double()
    layout = interleaved if interleave else (lambda rows: rows)
    q_up = ours.q_up.weight.view(H, NOPE + ROPE, Q_RANK)
    q_up = torch.cat([q_up[:, :NOPE], torch.stack([layout(head[NOPE:]) for head in q_up])], dim=1)
    kv_down = torch.cat([ours.kv_down.weight[:KV_RANK], layout(ours.kv_down.weight[KV_RANK:])])
    with torch.no_grad():
        theirs.q_a_proj.weight.copy_(ours.q_down.weight)
        theirs.q_a_layernorm.weight.copy_(ours.q_norm.weight)
        theirs.q_b_proj.weight.copy_(q_up.reshape(-1, Q_RANK))
        theirs.kv_a_proj_with_mqa.weight.copy_(kv_down)
        theirs.kv_a_layernorm.weight.copy_(ours.kv_norm.weight)
        theirs.kv_b_proj.weight.copy_(ours.kv_up.weight)
        theirs.o_proj.weight.copy_(ours.out_proj.weight)
    return theirs, modeling.DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("interleave", [False, True], ids=["rotate_half", "interleaved"])
def test_mla_equals_deepseek_v3_attention(interleave: bool) -> None:
    torch.manual_seed(0)
    ours = MultiHeadLatentAttention(
        D, 0, num_heads=H, kv_lora_rank=KV_RANK, q_lora_rank=Q_RANK, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, v_head_dim=V, norm_eps=1e-6, backend="reference",
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs, rotary = deepseek_from(ours, interleave)
    x = 0.05 * torch.randn(B, T, D, dtype=torch.float64)  # small latents, where the eps shows
    y, _ = ours(x, PositionContext(NoPositional(D, 64), 0, T))
    cos, sin = rotary(x, torch.arange(T)[None])
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected = theirs(x, (cos.double(), sin.double()), causal)[0]
    # both sides norm and build rotary tables in fp32: fp32-level agreement
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-7)

"""Mixture of Block Attention: the reference (explicit softmax and SDPA) == a dense-mask attention written
here query by query (fla has no naive MoBA: its op needs flash-attn), outputs and gradients, grouped heads,
odd lengths across block boundaries; the layer == fla's MoBA written out around that oracle (output norm,
optional gate); KV-cache decoding == the full forward with small blocks; fused == reference on GPU.
(Left padding with blocks of 4: tests/model/test_padding.py.)"""

from __future__ import annotations

import functools

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import build_positional, component_factory
from archifactory.model.mixins.moba import MixtureOfBlockAttention
from archifactory.model.mixins.reference.moba import moba_attention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32
SMALL = ("mixin.block_size=4", "mixin.topk=3")


def dense_moba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """MoBA of q [B, T, H, D] over k, v [B, T, H_kv, D] one query at a time: the blocks that ended
    before t are scored by q_t·mean(k over the block); the query's own block up to t and the top
    topk − 1 scored blocks form its key set; one softmax over it."""
    batch, seq_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, :, h // groups], v[b, :, h // groups]
            for t in range(seq_len):
                done = [c for c in range((t + 1) // block_size) if (c + 1) * block_size <= t]
                scores = [q[b, t, h] @ keys[c * block_size : (c + 1) * block_size].mean(0) for c in done]
                order = sorted(range(len(done)), key=lambda i: -float(scores[i].detach()))[: topk - 1]
                own = t // block_size
                chosen = [
                    j
                    for j in range(t + 1)
                    if j // block_size == own or j // block_size in {done[i] for i in order}
                ]
                logits = keys[chosen] @ q[b, t, h] * dim**-0.5
                out[b, t, h] = logits.softmax(0) @ values[chosen]
    return out


@pytest.mark.parametrize(
    "seq_len,kv_heads,block_size,topk,backend",
    [
        (19, 2, 4, 3, "reference"),
        (23, 4, 3, 2, "reference"),
        (14, 1, 5, 6, "reference"),
        (19, 2, 4, 3, "sdpa"),
    ],
)
def test_reference_matches_dense_mask_attention(
    seq_len: int, kv_heads: int, block_size: int, topk: int, backend: str
) -> None:
    torch.manual_seed(seq_len)
    q = (2 * torch.randn(2, seq_len, 4, 8, dtype=torch.float64)).requires_grad_()  # sharp gates
    k = torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, seq_len, kv_heads, 8, dtype=torch.float64, requires_grad=True)
    ours = moba_attention(*(t.transpose(1, 2) for t in (q, k, v)), 0, block_size, topk, None, None, backend)
    ours = ours.transpose(1, 2)
    theirs = dense_moba(q, k, v, block_size, topk)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours)
    grads = [torch.autograd.grad((o * upstream).sum(), [q, k, v]) for o in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=moba", "positional=rope", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> MixtureOfBlockAttention:
    layer = component_factory("mixin", compose(*SMALL, *overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharp gates: the selection matters
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None, rope: bool = True) -> PositionContext:
    scheme = (
        build_positional(compose().positional, HIDDEN, max_seq_len=64).double()
        if rope
        else NoPositional(HIDDEN, 64)
    )
    return PositionContext(scheme, start, length, pad_mask=pad_mask)


def fla_layer_by_hand(layer: MixtureOfBlockAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's MoBA layer with no positional scheme: q/k/v projections, optional per-head RMSNorm of q and
    k, MoBA (the dense oracle), per-head RMSNorm of the output (× σ(low-rank gate) with the gate), o_proj."""
    batch, seq_len, _ = x.shape
    q, k, v = layer.qkv_proj(x).split([HIDDEN, layer.kv_size, layer.kv_size], dim=-1)
    q, k, v = (t.view(batch, seq_len, -1, layer.head_dim) for t in (q, k, v))
    eps = layer.norm_eps

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    if layer.q_norm_weight is not None:
        q, k = rms(q, layer.q_norm_weight), rms(k, layer.k_norm_weight)
    o = rms(dense_moba(q, k, v, layer.block_size, layer.topk), layer.o_norm_weight).flatten(-2)
    if layer.gate_proj is not None:
        o = o * torch.sigmoid(layer.gate_proj(x))
    return o @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides", [(), ("mixin.num_kv_heads=2", "mixin.qk_norm=true", "mixin.output_gate=true")]
)
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(1, 15, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 15, rope=False))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefill", [1, 6, 13])
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    """Blocks of 4 (the registry's contract suite runs the default 256: no block is ever selected)."""
    layer = build("mixin.num_kv_heads=2")
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 19))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces = [out]
    for t in range(prefill, 19):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(19)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="topk"):
        MixtureOfBlockAttention(HIDDEN, 0, topk=1)
    with pytest.raises(ArchiFactoryError, match="block_size"):
        MixtureOfBlockAttention(HIDDEN, 0, block_size=0)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        MixtureOfBlockAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ArchiFactoryError, match="backend"):
        MixtureOfBlockAttention(HIDDEN, 0, backend="flash")
    layer = MixtureOfBlockAttention(HIDDEN, 0)
    assert layer.backend_name() == "sdpa"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), PositionContext(NoPositional(HIDDEN, 64), 0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    layer = MixtureOfBlockAttention(256, 0, num_heads=4, num_kv_heads=2, block_size=32, topk=3).cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.qkv_proj.weight], 3e-2, 6e-2)

"""PaTH attention: the blockwise reference == a pairwise loop of the definition == fla's naive oracle ==
decode steps; the layer's decode with every option; fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.path_attn import PaTHAttention
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.path_attn import path_attention, path_step
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, HQ, H, D = 2, 4, 2, 8  # grouped heads: two query heads per key head


def path_inputs(seq_len: int, dtype=torch.float64):
    """q, k, v, w (unit norm), β ∈ (0, 2), per-step log forget gates g (query heads)."""
    q = torch.randn(B, seq_len, HQ, D, dtype=dtype)
    k, v = torch.randn(B, seq_len, H, D, dtype=dtype), torch.randn(B, seq_len, H, D, dtype=dtype)
    w = l2_normalize(torch.randn(B, seq_len, H, D, dtype=dtype))
    beta = 2 * torch.rand(B, seq_len, H, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, seq_len, HQ, dtype=dtype) + 1)
    return [q, k, v, w, beta, g]


def pairwise(q, k, v, w, beta, g):
    """The definition, pair by pair: key j is carried through H_{j+1} .. H_i, then a gated causal softmax."""
    gate, group, scale = g.cumsum(1), HQ // H, D**-0.5
    outputs = []
    for i in range(q.shape[1]):
        logits = []
        for j in range(i + 1):
            key = k[:, j]
            for s in range(j + 1, i + 1):
                key = key - beta[:, s, :, None] * (key * w[:, s]).sum(-1, keepdim=True) * w[:, s]
            qk = (q[:, i] * key.repeat_interleave(group, dim=1)).sum(-1)
            logits.append(scale * (qk + gate[:, i] - gate[:, j]))
        probs = torch.stack(logits, dim=-1).softmax(-1)  # [B, HQ, j]
        outputs.append(torch.einsum("bhj,bjhd->bhd", probs, v[:, : i + 1].repeat_interleave(group, dim=2)))
    return torch.stack(outputs, dim=1)


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (11, 4), (13, 8)])
def test_blockwise_equals_pairwise_definition(seq_len: int, chunk_size: int) -> None:
    """fp64, grouped heads and a forget gate: outputs and every input gradient, across block boundaries."""
    inputs = path_inputs(seq_len)
    ours, loop = with_grad(inputs), with_grad(inputs)
    gate = ours[5].cumsum(1)
    out, _ = path_attention(*ours[:5], gate, gate, None, chunk_size)
    out_ref = pairwise(*loop)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), ours, allow_unused=True)
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), loop, allow_unused=True)  # T = 1: no H used
    for a, b, leaf in zip(grads, grads_ref, ours):
        zeros = torch.zeros_like(leaf)
        torch.testing.assert_close(
            zeros if a is None else a, zeros if b is None else b, rtol=1e-9, atol=1e-10
        )


def test_matches_fla_naive_oracle() -> None:
    """fla's `naive_path_attn` (per-step gates; it scales the gate with the logits, as its kernels do), fp32,
    T = 37: ours in blocks of 8, fla's in blocks of 16 with its own padding; outputs and gradients."""
    naive_path_attn = load_fla_naive("path_attn").naive_path_attn
    inputs = path_inputs(37, dtype=torch.float32)
    ours, theirs = with_grad(inputs), with_grad(inputs)
    gate = ours[5].cumsum(1)
    out, _ = path_attention(*ours[:5], gate, gate, None, 8)
    q, k, v, w, beta, g = theirs
    out_ref = naive_path_attn(q, k, v, w, beta, g, D**-0.5, 16)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), ours)
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), theirs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_decode_steps_equal_blockwise_and_carry_the_keys() -> None:
    """Token steps over a cache of carried keys == the blockwise form; the final cache == its carried keys."""
    q, k, v, w, beta, g = path_inputs(21)
    gate = g.cumsum(1)
    out, keys = path_attention(q, k, v, w, beta, gate, gate, None, 8, output_keys=True)
    cache = {"k": k[:, :0], "v": v[:, :0], "gate": gate[:, :0]}
    outputs = []
    for t in range(21):
        o, cache = path_step(q[:, t], k[:, t], v[:, t], w[:, t], beta[:, t], gate[:, t], cache)
        outputs.append(o)
    torch.testing.assert_close(torch.stack(outputs, dim=1), out, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(cache["k"], keys, rtol=1e-10, atol=1e-11)


OPTIONS = [
    {"use_forget_gate": True, "num_kv_heads": 1},
    {"use_qk_norm": True, "w_rank": 0},
    {"use_w_shortconv": False, "use_forget_gate": True},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_layer_prefill_chunks_and_steps_equal_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    layer = PaTHAttention(32, 0, num_heads=2, chunk_size=4, **options).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    scheme = NoPositional(32, 64)
    full = layer(x, PositionContext(scheme, 0, 19))[0]
    state = layer.init_state(2, x.device, x.dtype)
    outputs = []
    for start, end in [(0, 6), (6, 13), (13, 14), (14, 15), (15, 19)]:  # prefill, a chunk, steps, a chunk
        out, state = layer(x[:, start:end], PositionContext(scheme, start, end - start), state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-9, atol=1e-10)
    assert sum(t.numel() for t in state.values()) == 2 * layer.state_size(19)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_forget_gate", [False, True])
def test_fused_equals_reference_on_cuda(use_forget_gate: bool) -> None:
    """fla's `parallel_path_attn` vs the reference under bf16 autocast (head size 64): outputs, input
    gradients, and a prefill's output and carried-key cache."""
    pytest.importorskip("fla")
    torch.manual_seed(0)
    fused = PaTHAttention(256, 1, num_heads=4, use_forget_gate=use_forget_gate, backend="fused").cuda()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = PaTHAttention(
        256, 1, num_heads=4, use_forget_gate=use_forget_gate, backend="reference"
    ).cuda()
    reference.load_state_dict(fused.state_dict())
    assert fused.backend_name() == "fused" and reference.backend_name() == "reference"
    x = torch.randn(2, 200, 256, device="cuda")
    ctx = PositionContext(NoPositional(256, 256), 0, 200, torch.device("cuda"))
    outputs, grads = [], []
    for module in (fused, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(xi, ctx)[0]
        y.float().square().mean().backward()
        outputs.append(y.float())
        grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-3)
    state = reference.init_state(2, torch.device("cuda"), torch.float32)
    fused_out, fused_state = fused(x[:, :100], ctx, {k: v.clone() for k, v in state.items()})
    ref_out, ref_state = reference(x[:, :100], ctx, state)
    torch.testing.assert_close(fused_out, ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_state["k"], ref_state["k"], rtol=2e-2, atol=2e-2)

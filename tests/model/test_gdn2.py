"""Gated DeltaNet-2: the chunked reference == a token loop of the recurrence written here == fla's naive
oracles (recurrent and chunked); the layer == fla's layer math written out; decode == full forward;
fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.gdn2 import GatedDeltaNet2, gdn2_rule
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing
NO_POS = NoPositional(32, 64)


def gdn2_inputs(seq_len: int, dtype=torch.float64):
    """q, k (unit norm), v, per-channel log-decay g ∈ (−1, 0), erase b ∈ (0, 2), write w ∈ (0, 1); S₀."""
    q, k = (l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    g = -torch.rand(B, seq_len, H, K, dtype=dtype)
    erase = 2 * torch.rand(B, seq_len, H, K, dtype=dtype)
    write = torch.rand(B, seq_len, H, V, dtype=dtype)
    return [q, k, v, g, erase, write], torch.randn(B, H, K, V, dtype=dtype)


def gdn2_loop(q, k, v, g, erase, write, state):
    """The test's own loop: S ← (I − k (b⊙k)ᵀ) diag(e^g) S + k (w⊙v)ᵀ, o = Sᵀq/√K."""
    outputs = []
    for t in range(q.shape[1]):
        decayed = g[:, t].exp()[..., None] * state
        update = write[:, t] * v[:, t] - torch.einsum("bhk,bhkv->bhv", erase[:, t] * k[:, t], decayed)
        state = decayed + k[:, t, ..., None] * update[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * K**-0.5)
    return torch.stack(outputs, dim=1), state


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def gradients(out, state, leaves, weight):
    return torch.autograd.grad((out * weight).sum() + state.sin().sum(), leaves)


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (13, 4), (29, 8)])
def test_chunked_equals_token_loop(seq_len: int, chunk_size: int) -> None:
    """fp64: outputs, final state and every gradient (start state included), across chunk boundaries."""
    inputs, state = gdn2_inputs(seq_len)
    ours, loop = with_grad([*inputs, state]), with_grad([*inputs, state])
    out, final = gdn2_rule(*ours[:6], ours[6], True, chunk_size)
    out_ref, final_ref = gdn2_loop(*loop)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, final_ref, loop, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("oracle", ["naive_recurrent_gdn2", "naive_chunk_gdn2"])
def test_matches_fla_naive_oracle(oracle: str) -> None:
    """fla's naive GDN-2 oracles, fp32, T = 37 (ours in chunks of 16, fla's chunked one in its own chunks of
    16 with padding): outputs, final state, gradients."""
    fla_rule = getattr(load_fla_naive("gdn2"), oracle)
    inputs, state = gdn2_inputs(37, dtype=torch.float32)
    ours, theirs = with_grad([*inputs, state]), with_grad([*inputs, state])
    out, final = gdn2_rule(*ours[:6], ours[6], True, 16)
    q, k, v, g, erase, write, s0 = theirs
    extra = {"chunk_size": 16} if oracle == "naive_chunk_gdn2" else {}
    out_ref, final_ref = fla_rule(q, k, v, g, erase, write, None, s0, True, **extra)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, final_ref, theirs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_layer_equals_fla_layer_math() -> None:
    """The layer as fla's `GatedDeltaNet2.forward` computes it (its gates written out here from its source,
    then fla's naive recurrent oracle and a sigmoid-gated RMSNorm), fp64, with allow_neg_eigval."""
    naive = load_fla_naive("gdn2")
    torch.manual_seed(0)
    layer = GatedDeltaNet2(32, 0, num_heads=2, chunk_size=4, allow_neg_eigval=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = (t.reshape(2, 9, 2, -1) for t in qkv.split([32, 32, layer.value_dim], dim=-1))
    g = F.softplus(layer.f_proj(x) + layer.dt_bias).reshape(2, 9, 2, 16)
    g = -layer.A_log.exp()[:, None] * g
    erase = 2 * layer.b_proj(x).sigmoid().reshape(2, 9, 2, 16)
    write = layer.w_proj(x).sigmoid().reshape(2, 9, 2, -1)
    o, _ = naive.naive_recurrent_gdn2(l2_normalize(q), l2_normalize(k), v, g, erase, write)
    o = o.double()
    gate = layer.g_proj(x).reshape(2, 9, 2, -1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight * gate.sigmoid()
    expected = layer.out_proj(o.reshape(2, 9, -1))
    torch.testing.assert_close(layer(x, PositionContext(NO_POS, 0, 9))[0], expected, rtol=1e-5, atol=1e-6)


# off the defaults (test_contract*.py decode the defaults)
@pytest.mark.parametrize("options", [{"use_short_conv": False, "expand_v": 2.0}])
def test_layer_decode_equals_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    layer = GatedDeltaNet2(32, 0, num_heads=2, chunk_size=4, **options).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full = layer(x, PositionContext(NO_POS, 0, 11))[0]
    state = layer.init_state(2, x.device, x.dtype)
    prefill, state = layer(x[:, :5], PositionContext(NO_POS, 0, 5), state)  # a prefill, then tokens
    outputs = [prefill]
    for t in range(5, 11):
        out, state = layer(x[:, t : t + 1], PositionContext(NO_POS, t, 1), state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_reference_on_cuda() -> None:
    """fla's `chunk_gdn2` vs the reference under bf16 autocast: outputs, input gradients, a prefill's
    output and state (the delta-rule family's GPU check)."""
    pytest.importorskip("fla")
    from tests.model.test_delta_rule import _fused_vs_reference

    _fused_vs_reference(GatedDeltaNet2)

"""Comba: the chunked reference == a token loop of the paper's recurrence == fla's chunked naive oracle; the
layer's decode; fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.comba import Comba, comba_rule
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing
NO_POS = NoPositional(32, 64)


def comba_inputs(seq_len: int, dtype=torch.float64):
    """q, k, p (unit norm), v, β ∈ (0, 1), per-head log-decay g ∈ (−3, 0), a start state."""
    q, k, p = (l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype)) for _ in range(3))
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    beta = torch.rand(B, seq_len, H, dtype=dtype)
    g = -3 * torch.rand(B, seq_len, H, dtype=dtype)
    return [q, k, v, p, beta, g], torch.randn(B, H, K, V, dtype=dtype)


def comba_loop(q, k, v, p, beta, g, state):
    """The test's own token loop of S_t = (α_t I − β_t k_t p_tᵀ) S_{t-1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t/√K."""
    outputs = []
    for t in range(q.shape[1]):
        prediction = torch.einsum("bhk,bhkv->bhv", p[:, t], state)  # undecayed S_{t-1}ᵀ p_t
        update = beta[:, t, :, None] * (v[:, t] - prediction)
        state = g[:, t].exp()[..., None, None] * state + k[:, t, ..., None] * update[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * K**-0.5)
    return torch.stack(outputs, dim=1), state


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def gradients(out, state, leaves, weight):
    return torch.autograd.grad((out * weight).sum() + state.sin().sum(), leaves)


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (13, 4), (29, 8)])
def test_chunked_comba_equals_token_loop(seq_len: int, chunk_size: int) -> None:
    """fp64: forward, final state and every gradient (start state included), across chunk boundaries."""
    inputs, state = comba_inputs(seq_len)
    ours, loop = with_grad([*inputs, state]), with_grad([*inputs, state])
    out, final = comba_rule(*ours[:6], ours[6], True, chunk_size)
    out_ref, final_ref = comba_loop(*loop)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, final_ref, loop, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_matches_fla_chunk_oracle() -> None:
    """fla's `naive_chunk_comba` (the form its kernels compute), fp32, T = 37 (ours in chunks of 16, its own
    chunks of 16 with padding): outputs, final state, gradients. fla's `naive_recurrent_comba` applies the
    decay before the prediction (Gated DeltaNet's order), unlike its chunked naive form and kernels, so it
    is not the oracle."""
    naive_chunk_comba = load_fla_naive("comba").naive_chunk_comba

    inputs, state = comba_inputs(37, dtype=torch.float32)
    ours, theirs = with_grad([*inputs, state]), with_grad([*inputs, state])
    out, final = comba_rule(*ours[:6], ours[6], True, 16)
    q, k, v, p, beta, g, s0 = theirs
    out_ref, final_ref = naive_chunk_comba(
        q, k, v, p, g, beta, chunk_size=16, initial_state=s0, output_final_state=True
    )
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, ours, weight), gradients(out_ref, final_ref, theirs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# off the defaults (test_contract*.py decode the defaults)
@pytest.mark.parametrize("options", [{"use_output_correction": False, "use_inner_decay": False}])
def test_layer_decode_equals_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    layer = Comba(32, 0, num_heads=2, chunk_size=4, **options).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full = layer(x, PositionContext(NO_POS, 0, 11))[0]
    state = layer.init_state(2, x.device, x.dtype)
    outputs = []
    for t in range(11):
        out, state = layer(x[:, t : t + 1], PositionContext(NO_POS, t, 1), state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-9, atol=1e-10)


def test_zero_correction_equals_no_correction() -> None:
    """q̃ = q − D·p: D = 0 gives the layer without the output correction (same remaining weights)."""
    torch.manual_seed(0)
    layer = Comba(32, 0, num_heads=2, correction_factor=0.0).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    y = layer(x, PositionContext(NO_POS, 0, 5))[0]
    plain = Comba(32, 0, num_heads=2, use_output_correction=False).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "D"})
    torch.testing.assert_close(plain(x, PositionContext(NO_POS, 0, 5))[0], y, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_equals_reference_on_cuda() -> None:
    """fla's `chunk_comba` vs the reference under bf16 autocast: outputs, input gradients, a prefill's
    output and state (the delta-rule family's GPU check)."""
    pytest.importorskip("fla")
    from tests.model.test_delta_rule import _fused_vs_reference

    _fused_vs_reference(Comba)

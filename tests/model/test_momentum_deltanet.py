"""Momentum DeltaNet: the chunked reference == a token loop of the recurrence written here == fla's naive
recurrent oracle; the layer == fla's layer math written out; decode == full forward;
fused == reference on GPU."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.momentum_deltanet import MomentumDeltaNet
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.momentum_delta_rule import chunk_momentum_delta_rule
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing
NO_POS = NoPositional(32, 64)


def momentum_inputs(seq_len: int, dtype=torch.float64):
    """q, k, p (unit norm), v, log α ∈ (−1, 0), log μ ∈ (−2, 0), β ∈ (0, 1); start states S₀, M₀."""
    q, k, p = (l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype)) for _ in range(3))
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    log_alpha = -torch.rand(B, seq_len, H, dtype=dtype)
    log_mu = -2 * torch.rand(B, seq_len, H, dtype=dtype)
    beta = torch.rand(B, seq_len, H, dtype=dtype)
    states = [torch.randn(B, H, K, V, dtype=dtype) for _ in range(2)]
    return [q, k, v, p, log_alpha, log_mu, beta], states


def momentum_loop(q, k, v, p, log_alpha, log_mu, beta, s_state, m_state):
    """The test's own loop: w = Sᵀp − v, M ← μ M + k wᵀ, S ← α S − β M, o = Sᵀq/√K."""
    outputs = []
    for t in range(q.shape[1]):
        error = torch.einsum("bhk,bhkv->bhv", p[:, t], s_state) - v[:, t]
        m_state = log_mu[:, t].exp()[..., None, None] * m_state + k[:, t, ..., None] * error[..., None, :]
        s_state = log_alpha[:, t].exp()[..., None, None] * s_state - beta[:, t, :, None, None] * m_state
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], s_state) * K**-0.5)
    return torch.stack(outputs, dim=1), s_state, m_state


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def gradients(out, s_state, m_state, leaves, weight):
    return torch.autograd.grad((out * weight).sum() + s_state.sin().sum() + m_state.cos().sum(), leaves)


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (13, 4), (29, 8)])
def test_chunked_equals_token_loop(seq_len: int, chunk_size: int) -> None:
    """fp64: outputs, both final states and every gradient (start states included), across chunks."""
    inputs, states = momentum_inputs(seq_len)
    ours, loop = with_grad([*inputs, *states]), with_grad([*inputs, *states])
    out, (s_final, m_final) = chunk_momentum_delta_rule(*ours[:7], None, (ours[7], ours[8]), True, chunk_size)
    out_ref, s_ref, m_ref = momentum_loop(*loop)
    for a, b in ((out, out_ref), (s_final, s_ref), (m_final, m_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(
        gradients(out, s_final, m_final, ours, weight), gradients(out_ref, s_ref, m_ref, loop, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_matches_fla_naive_oracle() -> None:
    """fla's `recurrent_momentum_delta_rule_ref` (the oracle its fused-recurrent function runs), fp32,
    T = 37 (ours in chunks of 16): outputs, final (S, M), gradients. fla's chunked naive form is not the
    oracle: it adds 1e-6 to β inside a log and cancels exp(·) terms of opposite sign, which in its fp32
    leaves errors of ~1e-3 against its own recurrent form."""
    naive = load_fla_naive("momentum_delta_rule")
    inputs, states = momentum_inputs(37, dtype=torch.float32)
    ours, theirs = with_grad([*inputs, *states]), with_grad([*inputs, *states])
    out, (s_final, m_final) = chunk_momentum_delta_rule(*ours[:7], None, (ours[7], ours[8]), True, 16)
    q, k, v, p, log_alpha, log_mu, beta, s0, m0 = theirs
    out_ref, final = naive.recurrent_momentum_delta_rule_ref(
        q, k, v, log_alpha, log_mu, p, beta, torch.ones_like(beta), None, s0, m0, True
    )
    for a, b in ((out, out_ref), (s_final, final[0]), (m_final, final[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(
        gradients(out, s_final, m_final, ours, weight), gradients(out_ref, final[0], final[1], theirs, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_layer_equals_fla_layer_math() -> None:
    """The layer's coefficients and recurrence inputs as fla's `MomentumDeltaNet.forward` computes them
    (written out here from its source, then fla's naive recurrent oracle), fp64."""
    naive = load_fla_naive("momentum_delta_rule")
    torch.manual_seed(0)
    layer = MomentumDeltaNet(32, 0, num_heads=2, chunk_size=4).double()
    with torch.no_grad():
        layer.mu_decay.dt_bias.fill_(1.0)  # strong momentum decays, so that min_log_mu = -2 clamps some
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    ctx = PositionContext(NO_POS, 0, 9)
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = qkv.split([32, 32, layer.value_dim], dim=-1)
    q, k = (t.reshape(2, 9, 2, 16) for t in (q, k))
    v = v.reshape(2, 9, 2, layer.head_v_dim)
    tau = 32**0.5
    mu, alpha = layer.mu_decay, layer.head_decay  # fla's (Mu_log, m_proj, mu_bias), (A_log, a_proj, dt_bias)
    log_mu = (-mu.A_log.exp() * torch.nn.functional.softplus(mu.a_proj(x) + mu.dt_bias)).clamp(min=-2)
    log_alpha = -alpha.A_log.exp() * torch.nn.functional.softplus(alpha.a_proj(x) + alpha.dt_bias)
    eta = torch.tanh(layer.e_proj(x) / tau) + 1
    theta = torch.arctan(eta * layer.log_factor.exp())
    beta = torch.sin(theta) ** 2 * torch.sigmoid(layer.b_proj(x))
    log_alpha = (torch.cos(theta) ** 2).log() + log_alpha
    q = q - layer.D_log.exp()[None, None, :, None] * k
    q, k = l2_normalize(q), l2_normalize(k)
    o, _ = naive.recurrent_momentum_delta_rule_ref(
        q,
        k * eta[..., None],
        v,
        log_alpha,
        log_mu,
        k * log_alpha.exp()[..., None],
        beta,
        torch.ones_like(beta),
    )
    gate = layer.g_proj(x).reshape(2, 9, 2, -1)
    o = o.double()
    o = (
        o
        * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
        * layer.norm_weight
        * torch.nn.functional.silu(gate)
    )
    expected = layer.out_proj(o.reshape(2, 9, -1))
    torch.testing.assert_close(layer(x, ctx)[0], expected, rtol=1e-5, atol=1e-6)


# off the defaults (test_contract*.py decode the defaults)
@pytest.mark.parametrize(
    "options", [{"use_output_correction": False, "use_p_times_alpha": False, "use_gate": False}]
)
def test_layer_decode_equals_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    layer = MomentumDeltaNet(32, 0, num_heads=2, chunk_size=4, **options).double()
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
    """fla's `chunk_momentum_delta_rule` vs the reference under bf16 autocast: outputs, input gradients,
    a prefill's output and state (the delta-rule family's GPU check), and the momentum state."""
    pytest.importorskip("fla")
    from tests.model.test_delta_rule import _fused_vs_reference

    _fused_vs_reference(MomentumDeltaNet)

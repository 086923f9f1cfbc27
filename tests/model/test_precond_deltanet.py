"""Preconditioned Gated DeltaNet and KDA: the chunked reference == a token loop of the recurrence written
here == fla's naive recurrent oracles; each layer == fla's layer math written out; decode == full forward;
fused == reference on GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.precond_deltanet import PrecondGatedDeltaNet, PrecondKDA
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.precond_delta_rule import chunk_precond_delta_rule
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import load_fla_naive

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing
NO_POS = NoPositional(32, 64)
SQUASH = (1.5, 1e-6)


def precond_inputs(seq_len: int, per_channel: bool, dtype=torch.float64):
    """q, k (unit norm), v, log-decay g (per head or channel), β, g^A, β^A, a centre c; start (S₀, A₀)."""
    q, k = (l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    g = -torch.rand(B, seq_len, H, *((K,) if per_channel else ()), dtype=dtype)
    beta, beta_atk = 2 * torch.rand(B, seq_len, H, dtype=dtype), torch.rand(B, seq_len, H, dtype=dtype)
    g_atk = -torch.rand(B, seq_len, H, dtype=dtype)
    center = 0.5 * torch.randn(H, dtype=dtype) - 0.2
    states = [torch.randn(B, H, K, V, dtype=dtype), torch.rand(B, H, K, dtype=dtype)]
    return [q, k, v, g, beta, g_atk, beta_atk, center], states


def precond_loop(q, k, v, g, beta, g_atk, beta_atk, center, s_state, a_state):
    """The test's own loop from the paper's equations: A ← e^{g^A} A + β^A k², P = x^{−s(log(A+ε) − c)},
    S ← D S, S ← S + β (P k)(v − kᵀS)ᵀ, o = Sᵀq/√K."""
    squash_x, eps = SQUASH
    outputs = []
    for t in range(q.shape[1]):
        a_state = g_atk[:, t, :, None].exp() * a_state + beta_atk[:, t, :, None] * k[:, t] ** 2
        r = torch.log(a_state + eps) - center[:, None]
        precond = squash_x ** (-r / (1 + r.abs()))
        decay = g[:, t].exp()
        s_state = s_state * (decay[..., None] if decay.dim() == 3 else decay[..., None, None])
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], s_state)
        s_state = s_state + beta[:, t, :, None, None] * (precond * k[:, t])[..., None] * error[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], s_state) * K**-0.5)
    return torch.stack(outputs, dim=1), s_state, a_state


def with_grad(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def gradients(out, s_state, a_state, leaves, weight):
    return torch.autograd.grad((out * weight).sum() + s_state.sin().sum() + a_state.cos().sum(), leaves)


def run_ours(inputs, states, chunk_size: int):
    out, (s_final, a_final) = chunk_precond_delta_rule(
        *inputs, *SQUASH, (states[0], states[1]), True, chunk_size
    )
    return out, s_final, a_final


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (13, 4), (29, 8)])
def test_chunked_equals_token_loop(seq_len: int, chunk_size: int, per_channel: bool) -> None:
    """fp64: outputs, final S and A, every gradient (start states and the centre included)."""
    inputs, states = precond_inputs(seq_len, per_channel)
    ours, loop = with_grad([*inputs, *states]), with_grad([*inputs, *states])
    results = run_ours(ours[:8], ours[8:], chunk_size)
    expected = precond_loop(*loop)
    for a, b in zip(results, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(results[0])
    for a, b in zip(gradients(*results, ours, weight), gradients(*expected, loop, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_fla_naive_oracle(per_channel: bool) -> None:
    """fla's `naive_recurrent_precond_gated_delta_rule` (scalar decay) and `naive_recurrent_precond_kda`
    (per-channel decay), fp32, T = 37 (ours in chunks of 16): outputs, final S and A, gradients."""
    inputs, states = precond_inputs(37, per_channel, dtype=torch.float32)
    ours, theirs = with_grad([*inputs, *states]), with_grad([*inputs, *states])
    if per_channel:
        results = run_ours(ours[:8], ours[8:], 16)
    else:  # fla's scalar-decay oracle L2-normalises q and k itself: the same graph on our side
        results = run_ours(
            [F.normalize(ours[0], dim=-1), F.normalize(ours[1], dim=-1), *ours[2:8]], ours[8:], 16
        )
    q, k, v, g, beta, g_atk, beta_atk, center, s0, a0 = theirs
    if per_channel:
        naive = load_fla_naive("precond_kda").naive_recurrent_precond_kda
        expected = naive(q, k, v, g, g_atk, beta_atk, beta, None, s0, a0, True, *SQUASH, center)
    else:
        naive = load_fla_naive("precond_gated_delta_rule").naive_recurrent_precond_gated_delta_rule
        expected = naive(q, k, v, g_atk, g, beta_atk, beta, None, s0, a0, True, *SQUASH, center)
    for a, b in zip(results, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(results[0])
    for a, b in zip(gradients(*results, ours, weight), gradients(*expected, theirs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _fla_layer_math(layer, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """fla's PrecondGatedDeltaNet / PrecondKDA forward written out from its source (fp64), with fla's
    naive recurrent oracle for the recurrence, given q and k L2-normalised as fla's kernels do it
    (`l2norm`, eps 1e-6 under the root; the scalar oracle's own F.normalize then leaves them unit)."""
    qkv, _ = layer.conv(layer.qkv_proj(x))
    q, k, v = (t.reshape(2, 9, 2, -1) for t in qkv.split([32, 32, layer.value_dim], dim=-1))
    beta = 2 * layer.b_proj(x).sigmoid()  # allow_neg_eigval
    beta_atk = layer.b_atk_proj(x).sigmoid()
    atk = layer.atk_decay
    g_atk = -atk.A_log.exp() * F.softplus(atk.a_proj(x) + atk.dt_bias)
    if per_channel:
        g = -layer.A_log.exp()[:, None] * F.softplus(
            layer.f_proj(x).reshape(2, 9, 2, 16) + layer.dt_bias.view(2, 16)
        )
        naive = load_fla_naive("precond_kda").naive_recurrent_precond_kda
        o = naive(
            l2_normalize(q), l2_normalize(k), v, g, g_atk, beta_atk, beta, log_atk_scale=layer.log_atk_scale
        )[0]
        gate = layer.g_proj(x).reshape(2, 9, 2, -1).sigmoid()
    else:
        decay = layer.head_decay
        g = -decay.A_log.exp() * F.softplus(decay.a_proj(x) + decay.dt_bias)
        naive = load_fla_naive("precond_gated_delta_rule").naive_recurrent_precond_gated_delta_rule
        o = naive(
            l2_normalize(q), l2_normalize(k), v, g_atk, g, beta_atk, beta, log_atk_scale=layer.log_atk_scale
        )[0]
        gate = F.silu(layer.g_proj(x).reshape(2, 9, 2, -1))
    o = o.double()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm_weight * gate
    return layer.out_proj(o.reshape(2, 9, -1))


@pytest.mark.parametrize("cls,per_channel", [(PrecondGatedDeltaNet, False), (PrecondKDA, True)])
def test_layer_equals_fla_layer_math(cls, per_channel: bool) -> None:
    torch.manual_seed(0)
    layer = cls(32, 0, num_heads=2, chunk_size=4, allow_neg_eigval=True).double()
    with torch.no_grad():
        layer.log_atk_scale.add_(0.3 * torch.randn(2, dtype=torch.float64))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    expected = _fla_layer_math(layer, x, per_channel)
    # fla's naive oracles run in fp32 whatever their input dtype
    torch.testing.assert_close(layer(x, PositionContext(NO_POS, 0, 9))[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cls,options",
    [  # off the defaults (test_contract*.py decode the defaults)
        (PrecondGatedDeltaNet, {"use_gate": False}),
        (PrecondKDA, {"squash_x": 2.0}),
    ],
)
def test_layer_decode_equals_full_forward(cls, options: dict) -> None:
    torch.manual_seed(0)
    layer = cls(32, 0, num_heads=2, chunk_size=4, **options).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    full = layer(x, PositionContext(NO_POS, 0, 11))[0]
    state = layer.init_state(2, x.device, x.dtype)
    prefill, state = layer(x[:, :5], PositionContext(NO_POS, 0, 5), state)  # a prefill, then tokens
    outputs = [prefill]
    for t in range(5, 11):
        out, state = layer(x[:, t : t + 1], PositionContext(NO_POS, t, 1), state)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-9, atol=1e-10)


def test_squash_x_one_is_gated_deltanet() -> None:
    """x = 1 squashes the preconditioner to 1: the layer's recurrence is Gated DeltaNet's (held to the
    delta-rule reference through the same weights)."""
    from archifactory.model.mixins.deltanet import GatedDeltaNet

    torch.manual_seed(0)
    layer = PrecondGatedDeltaNet(32, 0, num_heads=2, squash_x=1.0).double()
    plain = GatedDeltaNet(32, 0, num_heads=2).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    ctx = PositionContext(NO_POS, 0, 7)
    torch.testing.assert_close(layer(x, ctx)[0], plain(x, ctx)[0], rtol=1e-10, atol=1e-11)
    assert math.isclose(layer.squash_x, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [PrecondGatedDeltaNet, PrecondKDA])
def test_fused_equals_reference_on_cuda(cls) -> None:
    """fla's `chunk_precond_gated_delta_rule` / `chunk_precond_kda` vs the reference under bf16 autocast:
    outputs, input gradients, a prefill's output and state (the delta-rule family's GPU check)."""
    pytest.importorskip("fla")
    from tests.model.test_delta_rule import _fused_vs_reference

    _fused_vs_reference(cls)

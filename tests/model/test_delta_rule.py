"""The delta-rule family: chunked references == token steps == fla's naive oracles; long sequences; fused on GPU."""

from __future__ import annotations

import pytest
import torch

from archifactory.model.mixins.deltanet import DeltaNet, GatedDeltaNet, KimiDeltaAttention
from archifactory.model.mixins.reference.delta_rule import (
    chunk_delta_rule,
    chunk_dplr,
    delta_rule_step,
    dplr_step,
    l2_normalize,
)
from archifactory.model.mixins.rwkv7 import RWKV7TimeMix
from archifactory.model.positional import NoPositional, PositionContext
from tests.model.oracles import recurrent

B, H, K, V = 2, 3, 8, 6  # H != B and K != V so a wrong layout raises instead of passing


def delta_inputs(seq_len: int, decay: str, dtype=torch.float64, strength: float = 1.0):
    """q, k (unit norm), v, β ∈ (0, 1), log-decay g (None | per head | per channel) and a start state."""
    q = torch.randn(B, seq_len, H, K, dtype=dtype)
    k = l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype))
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    beta = torch.rand(B, seq_len, H, dtype=dtype)
    shapes = {"none": None, "head": (B, seq_len, H), "channel": (B, seq_len, H, K)}
    g = None if shapes[decay] is None else -strength * torch.rand(shapes[decay], dtype=dtype) * 3
    state = torch.randn(B, H, K, V, dtype=dtype)
    return [q, k, v, beta, g], state


def dplr_inputs(seq_len: int, dtype=torch.float64):
    """RWKV-7's shape of the DPLR rule: α = −κ̂, β = κ̂ ⊙ a, log-decay in (−0.61, 0)."""
    q, k = torch.randn(B, seq_len, H, K, dtype=dtype), torch.randn(B, seq_len, H, K, dtype=dtype)
    v = torch.randn(B, seq_len, H, V, dtype=dtype)
    kappa = l2_normalize(torch.randn(B, seq_len, H, K, dtype=dtype))
    a = torch.rand(B, seq_len, H, K, dtype=dtype)
    g = -0.6065 * torch.rand(B, seq_len, H, K, dtype=dtype)
    return [q, k, v, -kappa, kappa * a, g], torch.randn(B, H, K, V, dtype=dtype)


def with_grad(tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def gradients(out: torch.Tensor, state: torch.Tensor, leaves, weight: torch.Tensor):
    loss = (out * weight).sum() + state.sin().sum()
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


@pytest.mark.parametrize("decay", ["none", "head", "channel"])
@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (9, 4), (16, 8), (29, 8), (37, 16)])
def test_chunked_delta_rule_equals_token_steps(decay: str, seq_len: int, chunk_size: int) -> None:
    """Forward, final state and every gradient (incl. the start state) at and across chunk boundaries."""
    inputs, state = delta_inputs(seq_len, decay)
    leaves = with_grad([*inputs, state])
    out, final = chunk_delta_rule(*leaves[:5], None, leaves[5], True, chunk_size)
    steps = with_grad([*inputs, state])
    out_ref, final_ref = recurrent(delta_rule_step, *steps[:5], state=steps[5])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, leaves, weight), gradients(out_ref, final_ref, steps, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seq_len,chunk_size", [(1, 4), (9, 4), (29, 8), (37, 16)])
def test_chunked_dplr_equals_token_steps(seq_len: int, chunk_size: int) -> None:
    inputs, state = dplr_inputs(seq_len)
    leaves = with_grad([*inputs, state])
    out, final = chunk_dplr(*leaves[:6], None, leaves[6], True, chunk_size)
    steps = with_grad([*inputs, state])
    out_ref, final_ref = recurrent(dplr_step, *steps[:6], state=steps[6])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-11)
    weight = torch.randn_like(out)
    for a, b in zip(gradients(out, final, leaves, weight), gradients(out_ref, final_ref, steps, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_delta_rule_matches_fla_oracles() -> None:
    """fla's naive functions (their own layouts and argument orders; see shared notes/oracles.md), fp32,
    T = 37 with chunk 16 (not a multiple): outputs, final states and input gradients."""
    pytest.importorskip("fla")
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.kda.naive import naive_recurrent_kda

    def head_first(*ts):  # [B, T, H, ...] -> [B, H, T, ...]
        return [t.transpose(1, 2) for t in ts]

    oracles = {
        "none": lambda q, k, v, b, g, s: (lambda o, st: (o.transpose(1, 2), st))(
            *delta_rule_recurrence(*head_first(q, k, v, b), initial_state=s)
        ),
        "head": lambda q, k, v, b, g, s: naive_recurrent_gated_delta_rule(
            q, k, v, b, g, initial_state=s, output_final_state=True
        ),
        "channel": lambda q, k, v, b, g, s: naive_recurrent_kda(
            q, k, v, g, b, initial_state=s, output_final_state=True
        ),
    }
    for decay, oracle in oracles.items():
        inputs, state = delta_inputs(37, decay, dtype=torch.float32)
        ours_leaves, oracle_leaves = with_grad(inputs), with_grad(inputs)
        out, final = chunk_delta_rule(*ours_leaves, None, state, True, 16)
        out_ref, final_ref = oracle(*oracle_leaves, state)
        torch.testing.assert_close(
            out, out_ref.float(), rtol=1e-4, atol=1e-4, msg=lambda m, d=decay: f"{d}: {m}"
        )
        torch.testing.assert_close(final, final_ref.float(), rtol=1e-4, atol=1e-4)
        weight = torch.randn_like(out)
        for a, b in zip(
            gradients(out, final, ours_leaves, weight),
            gradients(out_ref.float(), final_ref.float(), oracle_leaves, weight),
        ):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, d=decay: f"{d} grad: {m}")


def test_dplr_matches_fla_oracle() -> None:
    """`dplr_recurrence` takes [B, H, T, D], float32 only, and fixes the scale at 1/sqrt(K)."""
    pytest.importorskip("fla")
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    inputs, state = dplr_inputs(37, dtype=torch.float32)
    ours_leaves, oracle_leaves = with_grad(inputs), with_grad(inputs)
    out, final = chunk_dplr(*ours_leaves, None, state, True, 16)
    o_ref, final_ref = dplr_recurrence(*[t.transpose(1, 2) for t in oracle_leaves], initial_state=state)
    out_ref = o_ref.transpose(1, 2)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn_like(out)
    for a, b in zip(
        gradients(out, final, ours_leaves, weight), gradients(out_ref, final_ref, oracle_leaves, weight)
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("decay", ["head", "channel"])
def test_long_sequence_with_strong_decays_stays_finite_and_accurate(decay: str) -> None:
    """T = 4096 with log-decays down to −60 per step: every exponent the chunked form takes is <= 0, so fp32
    stays finite (forward and backward) and matches an fp64 run of the same chunked form."""
    inputs, state = delta_inputs(4096, decay, dtype=torch.float64, strength=20.0)
    expected = chunk_delta_rule(*inputs, None, state, True, 64 if decay == "head" else 16)[0]
    leaves = with_grad([None if t is None else t.float() for t in inputs])
    out, final = chunk_delta_rule(*leaves, None, state.float(), True, 64 if decay == "head" else 16)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    out.square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves if t is not None)


def test_long_dplr_sequence_stays_finite() -> None:
    inputs, state = dplr_inputs(4096, dtype=torch.float32)
    leaves = with_grad(inputs)
    out, final = chunk_dplr(*leaves, None, state, True, 16)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    out.square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_gated_deltanet_decay_follows_mamba2_parameterisation() -> None:
    """g = −exp(A_log) · softplus(a_proj x + dt_bias), by hand."""
    layer = GatedDeltaNet(32, 0, num_heads=4).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    decay = layer.head_decay
    expected = -decay.A_log.exp() * torch.nn.functional.softplus(x @ decay.a_proj.weight.T + decay.dt_bias)
    torch.testing.assert_close(layer.log_decay(x), expected)
    kda = KimiDeltaAttention(32, 0, num_heads=4).double()
    g = kda.log_decay(x)
    assert g.shape == (2, 5, 4, 8) and (g < 0).all()


def test_gated_deltanet_draws_a_from_zero_to_sixteen() -> None:
    """A ~ U[0, 16] (the paper's and fla 0.6.0's init), not U[1, 16]: 64 heads of a fixed seed reach
    below 1 (probability 1 − (15/16)^64 ≈ 98% of seeds; this one does) and never above 16."""
    torch.manual_seed(0)
    a = GatedDeltaNet(64, 0, num_heads=64, expand_v=1.0).head_decay.A_log.exp()
    assert a.min() < 1 and a.max() <= 16 and a.min() > 0


def test_rwkv7_decay_stays_in_its_bounded_range() -> None:
    """log w = −e^{−0.5} · sigmoid(·) ∈ (−0.607, 0): the reference never sees a stronger decay."""
    layer = RWKV7TimeMix(32, 0, num_heads=4, decay_rank=8, a_rank=8, gate_rank=8).double()
    with torch.no_grad():
        layer.w0.add_(50 * torch.randn_like(layer.w0))
    ctx = PositionContext(NoPositional(32, 64), 0, 9)
    y, _ = layer(torch.randn(2, 9, 32, dtype=torch.float64), ctx)
    assert torch.isfinite(y).all()


def _fused_vs_reference(cls, **options) -> None:
    torch.manual_seed(0)
    fused = cls(256, 1, num_heads=4, backend="fused", **options).cuda()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = cls(256, 1, num_heads=4, backend="reference", **options).cuda()
    reference.load_state_dict(fused.state_dict())
    assert fused.backend_name() == "fused" and reference.backend_name() == "reference"
    x = torch.randn(2, 200, 256, device="cuda")
    ctx = PositionContext(NoPositional(256, 256), 0, 200, torch.device("cuda"))
    outputs, input_grads = [], []
    for module in (fused, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = module(xi, ctx)[0]
        y.float().square().mean().backward()
        outputs.append(y.float())
        input_grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=5e-2, atol=5e-3)
    state = reference.init_state(2, torch.device("cuda"), torch.float32)
    fused_out, fused_state = fused(x[:, :100], ctx, {k: v.clone() for k, v in state.items()})
    ref_out, ref_state = reference(x[:, :100], ctx, state)
    torch.testing.assert_close(fused_out, ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_state["recurrent"], ref_state["recurrent"], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet, KimiDeltaAttention, RWKV7TimeMix])
def test_fused_equals_reference_on_cuda(cls) -> None:
    pytest.importorskip("fla")
    _fused_vs_reference(cls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_fused_equals_reference_with_grouped_value_heads(cls) -> None:
    """fla's GVA (gated: q/k of 4 heads, the kernel maps value heads onto them; deltanet: q/k repeated
    before fla's kernel) with a key head size of its own (48, not 256 / 4)."""
    pytest.importorskip("fla")
    _fused_vs_reference(cls, num_v_heads=8, head_dim=48)

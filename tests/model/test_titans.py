"""Titans' memory: the chunked reference == fla's naive oracles (its token loop and its chunked log-space
form: outputs, final state, gradients) at odd lengths; from a mid-mini-batch state with empty slots == a
token loop written here. (Decode == forward and padded rows: the registry suites.)

fla 0.6.0's naive Titans writes LayerNorm's backward as `D * g − g.sum() / (σ D) − ẑ (g·ẑ).sum() / (σ D)`
(a slip of brackets: its commented-out line above it is LayerNorm's true backward, which this reference
uses and `test_ttt.py` holds to autograd). The oracle tests swap fla's expression into the reference, so
that everything else — momentum, forgetting, mini-batch anchors, chunk carries — is held to fla's code."""

from __future__ import annotations

import importlib.util
import pathlib
import types

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.mixins.reference import titans as reference
from archifactory.model.mixins.reference.titans import TitansState, titans_linear
from archifactory.model.mixins.reference.ttt import inner_gradient
from tests.model.parity import assert_matches_token_loop

B, H, D = 2, 3, 8


def load_fla_titans() -> types.ModuleType:
    """fla's `ops/titans/naive.py` without importing fla (seconds: triton and every kernel): its one fla
    import, `combine_params_log`, is loaded from `log_impl.py` (torch only) and handed in."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        pytest.skip("fla is not installed")
    folder = pathlib.Path(spec.origin).parent / "ops" / "titans"
    log_spec = importlib.util.spec_from_file_location("fla_naive_titans_log_impl", folder / "log_impl.py")
    log_impl = importlib.util.module_from_spec(log_spec)
    log_spec.loader.exec_module(log_impl)
    source = (folder / "naive.py").read_text()
    module = types.ModuleType("fla_naive_titans")
    module.combine_params_log = log_impl.combine_params_log
    exec(
        compile(
            source.replace("from fla.ops.titans.log_impl import combine_params_log", ""), "naive", "exec"
        ),
        module.__dict__,
    )  # noqa: E501
    return module


def fla_gradient(k, v, z, ln_weight, ln_bias, eps):
    """fla's naive expression for ∂ℓ/∂z (halved: the reference doubles it), as written in fla 0.6.0."""
    mean, sigma = z.mean(-1, keepdim=True), torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    z_hat = (z - mean) / sigma
    g = (ln_weight * z_hat + ln_bias - (v - k)) * ln_weight
    d = z.shape[-1]
    return (
        d * g
        - g.sum(-1, keepdim=True) / (sigma * d)
        - z_hat * (g * z_hat).sum(-1, keepdim=True) / (sigma * d)
    )


def inputs(seq_len: int, dtype=torch.float64) -> list[torch.Tensor]:
    """q, k (unit norm), v; θ ∈ (0, 0.1), η ∈ (0.5, 1), α ∈ (0, 0.2); the inner LN's gain and shift."""
    q, k = (F.normalize(torch.randn(B, seq_len, H, D, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(B, seq_len, H, D, dtype=dtype)
    theta = 0.1 * torch.rand(B, seq_len, H, dtype=dtype)
    eta, alpha = (
        0.5 + 0.5 * torch.rand(B, seq_len, H, dtype=dtype),
        0.2 * torch.rand(B, seq_len, H, dtype=dtype),
    )
    ln = [1 + 0.3 * torch.randn(H, D, dtype=dtype), 0.3 * torch.randn(H, D, dtype=dtype)]
    return [q, k, v, theta, eta, alpha, *ln]


def leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("seq_len,chunk,use_chunk", [(13, 4, False), (37, 16, False), (16, 4, True)])
def test_reference_equals_fla_naive(monkeypatch, seq_len: int, chunk: int, use_chunk: bool) -> None:
    """fla's `chunk_titans_linear_ref` (fp32; its token loop, or its chunked log-space form) from a random
    memory: outputs and every gradient at any length; the final memory at whole mini-batches (fla pads a
    partial last one with zero gates, then copies the last token's gates into the last pad, decaying M)."""
    naive = load_fla_titans()
    monkeypatch.setattr(reference, "inner_gradient", fla_gradient)
    base = [*inputs(seq_len, torch.float32), 0.3 * torch.randn(B, H, D, D)]
    ours, theirs = leaves(base), leaves(base)
    q, k, v, theta, eta, alpha, w, b, memory = ours
    state = TitansState(memory, memory, torch.zeros_like(memory))
    out, final = titans_linear(q, k, v, theta, eta.log(), torch.log1p(-alpha), w, b, state, None, chunk)
    q, k, v, theta, eta, alpha, w, b, memory = theirs
    out_ref, final_ref = naive.chunk_titans_linear_ref(
        q,
        k,
        v,
        w,
        b,
        theta[..., None],
        alpha[..., None],
        eta[..., None],
        1e-6,
        chunk,
        memory,
        True,
        use_chunk,
    )
    torch.testing.assert_close(out, out_ref, rtol=2e-4, atol=2e-4)
    if seq_len % chunk == 0:
        torch.testing.assert_close(final.memory, final_ref, rtol=2e-4, atol=2e-4)
    weight = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad((out * weight).sum(), ours), torch.autograd.grad((out_ref * weight).sum(), theirs)
    ):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def token_loop(q, k, v, theta, eta, alpha, w, b, state: TitansState, real, phase: int, chunk: int):
    """The test's own loop: S ← ηS − 2θ kᵀ∂ℓ/∂z (at the anchor M₀), M ← (1 − α)M + S, z = qM; the anchor
    moves to M after a mini-batch's last token; empty slots do nothing."""
    memory, anchor, momentum = state
    outputs = []
    for t in range(q.shape[1]):
        if not real[t]:
            outputs.append(torch.zeros_like(q[:, t]))
            continue
        q_t, k_t, v_t = q[:, t, :, None], k[:, t, :, None], v[:, t, :, None]  # [B, H, 1, D]
        grad = inner_gradient(k_t, v_t, k_t @ anchor, w[:, None], b[:, None], 1e-6)
        momentum = eta[:, t, :, None, None] * momentum - 2 * theta[:, t, :, None, None] * k_t.mT @ grad
        memory = (1 - alpha[:, t, :, None, None]) * memory + momentum
        z = q_t @ memory
        outputs.append((z + F.layer_norm(z, (D,), eps=1e-6) * w[:, None] + b[:, None])[:, :, 0])
        phase += 1
        if phase == chunk:
            anchor, phase = memory, 0
    return torch.stack(outputs, dim=1), TitansState(memory, anchor, momentum)


def test_mid_mini_batch_state_and_empty_slots_equal_a_token_loop() -> None:
    """A stream entering with 2 of 4 slots filled (M ≠ M₀, S ≠ 0), 11 tokens, ending mid-mini-batch, with
    2 empty leading and 2 empty trailing slots (the layer's grid): outputs, the whole state, gradients."""
    chunk, seq_len = 4, 15
    real = torch.zeros(seq_len, dtype=torch.bool)
    real[2:13] = True
    state = TitansState(*(0.3 * torch.randn(B, H, D, D, dtype=torch.float64) for _ in range(3)))
    base = inputs(seq_len)
    ours, loop = leaves(base), leaves(base)
    q, k, v, theta, eta, alpha, w, b = ours
    mask = real[None].expand(B, -1)
    gates = [
        torch.where(mask[..., None], g, 0) for g in (theta, eta.log(), torch.log1p(-alpha))
    ]  # the grid's zeros
    out, final = titans_linear(q, k, v, *gates, w, b, state, mask, chunk)
    out_ref, final_ref = token_loop(*loop, state, real, 2, chunk)
    state_loss = lambda s: s.memory.sin().sum() + s.momentum.cos().sum()
    assert_matches_token_loop((out, final), (out_ref, final_ref), real, (ours, loop), state_loss)

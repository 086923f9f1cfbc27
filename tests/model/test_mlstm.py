"""mLSTM: the chunkwise reference == the stabilised token-by-token recurrence written here (outputs, final
(C, n, m), gradients; odd lengths across chunk boundaries, from a warm state, with strong gates) and == the
paper's unstabilised recurrence (no max-state); a pad step is the identity; the layer == xLSTM 7B's mLSTM
layer written out; 7B's gate init. Decode == forward and padded rows are the registry suites'
(test_contract*, test_padding_mixins). No fused path exists (fla has no mLSTM kernel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.mlstm import MLSTM
from archifactory.model.mixins.reference.mlstm import chunk_mlstm, mlstm_step
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config

HIDDEN, HEADS = 32, 4


def recurrent_mlstm(q, k, v, i, f, state=None, eps=1e-6):
    """xLSTM's stabilised mLSTM token by token: m_t = max(f_t + m, ĩ_t); C, n decayed by exp(f_t + m − m_t)
    and written with exp(ĩ_t − m_t); h_t = C_tᵀ q̂ / (max(|n_t·q̂|, exp(−m_t)) + eps), q̂ = q/√K.
    Returns (h [B, T, H, V], (C, n, m)); state None = zeros."""
    batch, seq_len, heads, key_dim = q.shape
    if state is None:
        state = (
            q.new_zeros(batch, heads, key_dim, v.shape[-1]),
            q.new_zeros(batch, heads, key_dim),
            q.new_zeros(batch, heads),
        )
    memory, normaliser, m = state
    outputs = []
    for t in range(seq_len):
        m_new = torch.maximum(f[:, t] + m, i[:, t])
        forget, write = (f[:, t] + m - m_new).exp(), (i[:, t] - m_new).exp()
        outer = torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        memory = forget[..., None, None] * memory + write[..., None, None] * outer
        normaliser = forget[..., None] * normaliser + write[..., None] * k[:, t]
        m = m_new
        q_hat = q[:, t] / key_dim**0.5
        read = torch.einsum("bhkv,bhk->bhv", memory, q_hat)
        denominator = torch.maximum((normaliser * q_hat).sum(-1).abs(), (-m).exp()) + eps
        outputs.append(read / denominator[..., None])
    return torch.stack(outputs, 1), (memory, normaliser, m)


def inputs(seq_len: int, gate_scale: float = 3.0, batch: int = 2):
    generator = torch.Generator().manual_seed(seq_len)
    q, k = (torch.randn(batch, seq_len, 3, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    v = torch.randn(batch, seq_len, 3, 5, dtype=torch.float64, generator=generator)
    i = gate_scale * torch.randn(batch, seq_len, 3, dtype=torch.float64, generator=generator)
    f = F.logsigmoid(
        gate_scale * torch.randn(batch, seq_len, 3, dtype=torch.float64, generator=generator) + 2
    )
    return [t.requires_grad_() for t in (q, k, v, i, f)]


def warm_state(batch: int = 2):
    generator = torch.Generator().manual_seed(7)
    memory = torch.randn(batch, 3, 4, 5, dtype=torch.float64, generator=generator)
    normaliser = torch.randn(batch, 3, 4, dtype=torch.float64, generator=generator)
    return memory, normaliser, torch.randn(batch, 3, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("seq_len,chunk,warm", [(1, 4, False), (13, 4, False), (19, 5, True), (9, 16, True)])
def test_chunked_matches_the_recurrence(seq_len: int, chunk: int, warm: bool) -> None:
    tensors = inputs(seq_len)
    state = warm_state() if warm else None
    ours, our_state = chunk_mlstm(*tensors, state, chunk)
    theirs, their_state = recurrent_mlstm(*tensors, state)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(our_state, their_state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ours)
    loss = [
        (h * upstream).sum() + s[0].sum() + s[1].sum() for h, s in ((ours, our_state), (theirs, their_state))
    ]
    grads = [torch.autograd.grad(value, tensors) for value in loss]
    for name, a, b in zip("qkvif", *grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_strong_gates_stay_finite_and_exact() -> None:
    """Input gates up to ±150 over 300 steps (exp(ĩ) alone overflows fp32 past 88): the chunked form in
    fp32 stays finite and is as close to the fp64 recurrence as the fp32 recurrence is (~2e-4)."""
    q, k, v, i, f = (t.detach() for t in inputs(300, batch=1))
    i = 15 * i
    ours, (memory, _, m) = chunk_mlstm(*(t.float() for t in (q, k, v, i, f)), None, 64)
    theirs, (_, _, their_m) = recurrent_mlstm(q, k, v, i, f)
    assert i.abs().max() > 100 and torch.isfinite(ours).all() and torch.isfinite(memory).all()
    # |n·q̂| near its floor makes a few read-outs ill-conditioned in fp32: compare as a whole
    assert ((ours.double() - theirs).norm() / theirs.norm()).item() < 5e-4
    torch.testing.assert_close(m.double(), their_m, rtol=1e-5, atol=1e-5)


def test_stabiliser_leaves_the_papers_read_out() -> None:
    """With eps = 0 the output is the paper's unstabilised h_t = C_tᵀ q̂ / max(|n_t·q̂|, 1), C and n
    written with exp(ĩ) and decayed by the forget gate: the max-state m only rescales."""
    q, k, v, i, f = (t.detach() for t in inputs(17, gate_scale=1.0))
    ours, _ = chunk_mlstm(q, k, v, i, f, None, 4, eps=0.0)
    memory, normaliser, expected = 0.0, 0.0, []
    for t in range(17):
        forget, write = f[:, t].exp(), i[:, t].exp()
        memory = (
            forget[..., None, None] * memory + write[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None]
        )
        normaliser = forget[..., None] * normaliser + write[..., None] * k[:, t]
        q_hat = q[:, t] / 2.0
        denominator = (normaliser * q_hat).sum(-1).abs().clamp_min(1.0)
        expected.append(torch.einsum("bhkv,bhk->bhv", memory, q_hat) / denominator[..., None])
    torch.testing.assert_close(ours, torch.stack(expected, 1), rtol=1e-10, atol=1e-12)


def test_a_pad_step_is_the_identity() -> None:
    """Input gate −inf, log forget 0: C, n and m unchanged exactly, in the step and in the chunks."""
    q, k, v, _, _ = (t.detach() for t in inputs(3))
    state = warm_state()
    minus_inf, zero = (
        torch.full((2, 3), float("-inf"), dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.float64),
    )
    _, after = mlstm_step(q[:, 0], k[:, 0], v[:, 0], minus_inf, zero, state, 1e-6)
    for a, b in zip(after, state):
        assert torch.equal(a, b)
    gates = (minus_inf[:, None].expand(2, 3, 3), zero[:, None].expand(2, 3, 3))
    _, after = chunk_mlstm(q, k, v, *gates, state, 2)
    for a, b in zip(after, state):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def build(*overrides: str) -> MLSTM:
    cfg = compose_config(
        [
            "mixin=mlstm",
            "positional=none",
            f"model.hidden_size={HIDDEN}",
            f"model.num_heads={HEADS}",
            *overrides,
        ]
    )
    layer = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def xlstm7b_layer_by_hand(layer: MLSTM, x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """xLSTM 7B's mLSTMLayer (weight_mode fused): q, k, v, o-gate from one projection; ĩ, f̃ soft-capped
    (cap·tanh(·/cap)); the cell; LayerNorm per head (weight, no bias, eps 1e-6); sigmoid(o) ⊙; out_proj."""
    batch, seq_len, _ = x.shape
    q, k, v, o = (x @ layer.qkvo_proj.weight.T).split(layer.widths, dim=-1)
    q, k, v = (t.view(batch, seq_len, HEADS, -1) for t in (q, k, v))
    gates = x @ layer.gate_proj.weight.T + layer.gate_proj.bias
    if cap is not None:
        gates = cap * torch.tanh(gates / cap)
    i, f = gates.chunk(2, dim=-1)
    h, _ = recurrent_mlstm(q, k, v, i, F.logsigmoid(f))
    mean, var = h.mean(-1, keepdim=True), h.var(-1, keepdim=True, unbiased=False)
    normed = ((h - mean) / (var + 1e-6).sqrt()).flatten(-2) * layer.norm_weight
    return (torch.sigmoid(o) * normed) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "overrides,cap",
    [
        (("mixin.chunk_size=4",), 15.0),
        (("mixin.chunk_size=5", "mixin.gate_soft_cap=null", "mixin.qk_dim_factor=1.0"), None),
    ],
)
def test_layer_matches_xlstm7b_layer_by_hand(overrides: tuple[str, ...], cap: float | None) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, PositionContext(NoPositional(HIDDEN, 64), 0, 11))
    expected = xlstm7b_layer_by_hand(layer, x, cap)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(y)
    params = [x, layer.qkvo_proj.weight, layer.gate_proj.weight, layer.gate_proj.bias, layer.norm_weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gate_init_and_bad_options() -> None:
    layer = MLSTM(HIDDEN, 0, num_heads=4)
    assert not layer.gate_proj.weight.any()
    assert layer.gate_proj.bias.tolist() == pytest.approx([-10.0] * 4 + [3.0, 4.0, 5.0, 6.0])
    assert (layer.head_qk_dim, layer.head_v_dim) == (4, 8)
    assert layer.state_size(100) == 4 * (4 * 8 + 4 + 1) and layer.backend_name() == "reference"
    with pytest.raises(ArchiFactoryError, match="num_heads"):
        MLSTM(HIDDEN, 0, num_heads=5)
    with pytest.raises(ArchiFactoryError, match="qk_dim_factor"):
        MLSTM(HIDDEN, 0, qk_dim_factor=0.3)
    with pytest.raises(ArchiFactoryError, match="chunk_size"):
        MLSTM(HIDDEN, 0, chunk_size=0)

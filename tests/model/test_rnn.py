"""lstm / rnn: recurrence over time (not batch), hand-written cell equivalence, decode, options; rwkv_cmix."""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.ffn.rwkv_channel_mix import RWKVChannelMix
from archifactory.model.mixins.rnn import ElmanRNNMixin, LSTMMixin
from archifactory.model.positional import NoPositional, PositionContext

HIDDEN = 32


def ctx(start: int, length: int) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 0), start, length)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


VARIANTS = {
    "lstm": lambda: LSTMMixin(HIDDEN, 0),
    "lstm_proj_2layers": lambda: LSTMMixin(HIDDEN, 0, inner_size=24, proj_size=8, rnn_layers=2),
    "rnn": lambda: ElmanRNNMixin(HIDDEN, 0),
    "rnn_relu_2layers": lambda: ElmanRNNMixin(HIDDEN, 0, inner_size=20, nonlinearity="relu", rnn_layers=2),
}


def lstm_by_hand(mixin: LSTMMixin, x: torch.Tensor) -> torch.Tensor:
    """The LSTM cell written out step by step, with the module's own weights."""
    rnn, batch = mixin.rnn, x.shape[0]
    inputs = x
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        bias = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        w_hr = getattr(rnn, f"weight_hr_l{layer}", None)
        h = x.new_zeros(batch, w_hh.shape[1])
        c = x.new_zeros(batch, mixin.inner_size)
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = (inputs[:, t] @ w_ih.t() + h @ w_hh.t() + bias).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.t()
            outputs.append(h)
        inputs = torch.stack(outputs, dim=1)
    return mixin.out_proj(inputs)


def rnn_by_hand(mixin: ElmanRNNMixin, x: torch.Tensor, act) -> torch.Tensor:
    rnn, inputs = mixin.rnn, x
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        bias = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        h = x.new_zeros(x.shape[0], mixin.inner_size)
        outputs = []
        for t in range(x.shape[1]):
            h = act(inputs[:, t] @ w_ih.t() + h @ w_hh.t() + bias)
            outputs.append(h)
        inputs = torch.stack(outputs, dim=1)
    return mixin.out_proj(inputs)


@pytest.mark.parametrize("variant", ["lstm", "lstm_proj_2layers"])
def test_lstm_equals_hand_written_cell_loop(variant: str) -> None:
    mixin = perturbed(VARIANTS[variant]())
    x = torch.randn(3, 9, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(mixin(x, ctx(0, 9))[0], lstm_by_hand(mixin, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant,act", [("rnn", torch.tanh), ("rnn_relu_2layers", torch.relu)])
def test_rnn_equals_hand_written_loop(variant: str, act) -> None:
    mixin = perturbed(VARIANTS[variant]())
    x = torch.randn(3, 9, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(mixin(x, ctx(0, 9))[0], rnn_by_hand(mixin, x, act), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recurrence_runs_over_time_not_batch(variant: str) -> None:
    """The seed's bug: a time-first nn.LSTM fed [B, T, D] recurs over the batch. Here sequence 0 must not
    see sequence 1, and the first token must not see later tokens."""
    mixin = perturbed(VARIANTS[variant]())
    x = torch.randn(3, 7, HIDDEN, dtype=torch.float64)
    y = mixin(x, ctx(0, 7))[0]
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])
    x2[:, 5:] += 1.0
    y2 = mixin(x2, ctx(0, 7))[0]
    torch.testing.assert_close(y2[0, :5], y[0, :5], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(y2[2, :5], y[2, :5], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(y2[1], y[1])


@pytest.mark.parametrize("variant", ["lstm_proj_2layers", "rnn_relu_2layers"])  # defaults: test_contract.py
@pytest.mark.parametrize("seq_len,prefill", [(11, 4), (6, 0)])
def test_forward_equals_prefill_plus_decode(variant: str, seq_len: int, prefill: int) -> None:
    mixin = perturbed(VARIANTS[variant]())
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64)
    full = mixin(x, ctx(0, seq_len))[0]
    state = mixin.init_state(2, x.device, x.dtype)
    pieces = []
    if prefill:
        out, state = mixin(x[:, :prefill], ctx(0, prefill), state)
        pieces.append(out)
    for t in range(prefill, seq_len):
        out, state = mixin(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert all(t.shape[0] == 2 for t in state.values()), "states are batch-first"
    assert sum(t[0].numel() for t in state.values()) == mixin.state_size(seq_len)


def test_options_are_validated() -> None:
    with pytest.raises(ArchiFactoryError, match="nonlinearity"):
        ElmanRNNMixin(HIDDEN, 0, nonlinearity="gelu")
    with pytest.raises(ArchiFactoryError, match="proj_size"):
        LSTMMixin(HIDDEN, 0, proj_size=HIDDEN)
    with pytest.raises(ArchiFactoryError, match="rnn_layers"):
        LSTMMixin(HIDDEN, 0, rnn_layers=0)


def test_lstm_forget_bias_starts_at_one() -> None:
    rnn = LSTMMixin(HIDDEN, 0).rnn
    forget = rnn.bias_ih_l0[HIDDEN : 2 * HIDDEN] + rnn.bias_hh_l0[HIDDEN : 2 * HIDDEN]
    torch.testing.assert_close(forget, torch.ones(HIDDEN))


def test_channel_mix_token_shift_is_causal_and_matches_formula() -> None:
    ffn = perturbed(RWKVChannelMix(HIDDEN, 0))
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    y = ffn(x)[0]
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    k = torch.relu(ffn.key(x + (prev - x) * ffn.time_maa_k)) ** 2
    r = torch.sigmoid(ffn.receptance(x + (prev - x) * ffn.time_maa_r))
    torch.testing.assert_close(y, r * ffn.out_proj(k), rtol=1e-12, atol=1e-13)
    x2 = x.clone()
    x2[:, 3] += 1.0  # token 3 changes outputs 3 and 4 (shift) only
    y2 = ffn(x2)[0]
    torch.testing.assert_close(y2[:, :3], y[:, :3], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(y2[:, 5:], y[:, 5:], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(y2[:, 4], y[:, 4])

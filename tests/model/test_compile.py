"""Compile-clean: `torch._dynamo.explain` finds no graph break in a model built with any registered mixin
(or any FFN, or any positional scheme), so torch.compile produces one graph per model with no host sync
per layer.

A new mixin or FFN is covered with no edit here. `lstm` and `rnn` are the documented exception: Dynamo does not
trace cuDNN-style RNN modules (`nn.LSTM` / `nn.RNN`), which then run eager inside a compiled model; for
them every break must be that one, so any other sync in their code still fails.
"""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from tests.helpers import compose_config

EAGER_RNN_MIXINS = {"lstm", "rnn"}  # nn.LSTM / nn.RNN: Dynamo refuses them (README "Compile")
RNN_BREAK = "Dynamo does not support RNN, GRU, or LSTM"
SEQ_LEN = 24


SHAPE = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.vocab_size=64",
    "model.max_seq_len=64",
]


def explain(overrides: list[str]):
    cfg = compose_config([*SHAPE, *overrides])
    if "chunk_size" in cfg.mixin:  # chunk 16: the traced graph crosses into a partial chunk (24 = 16+8)
        cfg = compose_config([*SHAPE, *overrides, "mixin.chunk_size=16"])
    model = build_model(cfg, 64)
    ids = torch.randint(0, 64, (2, SEQ_LEN))
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(ids, targets=ids)
    finally:
        torch._dynamo.reset()


def reasons(result) -> list[str]:
    return [str(getattr(b, "reason", b)) for b in result.break_reasons]


@pytest.mark.parametrize("mixin", sorted(components("mixin")))
def test_no_graph_breaks_in_any_mixin(mixin: str) -> None:
    # one layer: a mixin's layers run the same code (only their constants differ with the depth); the
    # multi-layer paths (state through the stack, value residual) are the tests below and test_value_residual's
    result = explain([f"mixin={mixin}", "positional=rope", "model.num_layers=1"])
    if mixin in EAGER_RNN_MIXINS:
        assert result.graph_break_count > 0, f"{mixin} compiles whole now: drop it from EAGER_RNN_MIXINS"
        assert all(RNN_BREAK in reason for reason in reasons(result)), reasons(result)
        return
    assert result.graph_break_count == 0, "\n".join(reasons(result))


@pytest.mark.parametrize("ffn", sorted(components("ffn")))
def test_no_graph_breaks_in_any_ffn(ffn: str) -> None:
    """Routed FFNs included: under compile their default `dispatch: auto` takes a static-shape layout."""
    result = explain(["mixin=gqa", f"ffn={ffn}"])
    assert result.graph_break_count == 0, "\n".join(reasons(result))


@pytest.mark.parametrize("positional", sorted(components("positional")))
def test_no_graph_breaks_in_any_positional_scheme(positional: str) -> None:
    result = explain(["mixin=gqa", f"positional={positional}"])
    assert result.graph_break_count == 0, "\n".join(reasons(result))


def test_decoding_with_a_state_has_no_graph_breaks() -> None:
    """Prefill and decode steps: positions come from the model's Python-int counter, never the device."""
    cfg = compose_config([*SHAPE, "mixin=gqa", "positional=alibi"])
    model = build_model(cfg, 64).eval()
    state = model.init_state(1)
    with torch.no_grad():
        state = model(torch.randint(0, 64, (1, 5)), state=state).state
        torch._dynamo.reset()
        result = torch._dynamo.explain(model)(torch.randint(0, 64, (1, 1)), state=state)
    torch._dynamo.reset()
    assert result.graph_break_count == 0, "\n".join(reasons(result))


def test_learned_table_bound_is_checked_before_the_forward() -> None:
    """The bound moved out of the hot path but still refuses, for a long input and for decoding past it."""
    model = build_model(compose_config([*SHAPE, "positional=learned", "model.max_seq_len=8"]), 64).eval()
    with pytest.raises(ArchiFactoryError, match="beyond positional=learned's table of 8"):
        model(torch.randint(0, 64, (1, 9)))
    state = model.init_state(1)
    with torch.no_grad():
        state = model(torch.randint(0, 64, (1, 8)), state=state).state
        with pytest.raises(ArchiFactoryError, match="position 8 is beyond"):
            model(torch.randint(0, 64, (1, 1)), state=state)

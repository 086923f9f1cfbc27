"""Rollouts decode with each architecture's own state: the log-prob recorded for each token as it was
sampled equals the one a fresh full forward over prompt + completion gives (what num_iterations > 1 uses
as the old policy), for attention and recurrent mixins, with prompts of several lengths in one call."""

from __future__ import annotations

import pytest
import torch

from archifactory.config.compose import compose
from archifactory.grpo.rollout import sample, sequence_logps
from archifactory.model.build import build_model


@pytest.mark.parametrize("mixin", ["gqa", "gated_deltanet", "mamba2"])
def test_recorded_logps_equal_a_fresh_forward(mixin: str) -> None:
    cfg = compose([f"mixin={mixin}", "model=tiny", "model.hidden_size=32", "model.num_layers=2",
                   "trainer.seq_len=64"])  # fmt: skip
    model = build_model(cfg, 48)
    prompts = [[1, 2, 3, 4]] * 3 + [[5, 6]] * 3
    stop = 7
    rollout = sample(model, prompts, 12, 0.9, 0.95, [stop], 0, list(range(6)))
    assert rollout.mask.any(-1).all() and not rollout.mask.all()  # some rows stopped early
    for row in range(6):  # a stopped row keeps its stop token, then only padding
        tokens = rollout.completion(row)
        assert stop not in tokens[:-1] and (len(tokens) == rollout.tokens.shape[1] or tokens[-1] == stop)
    fresh, _ = sequence_logps(model, rollout, 0.9)
    torch.testing.assert_close(fresh * rollout.mask, rollout.old_logp, rtol=1e-5, atol=1e-5)
    assert (rollout.old_logp[rollout.mask] < 0).all()
    again = sample(model, prompts, 12, 0.9, 0.95, [stop], 0, list(range(6)))
    assert torch.equal(again.tokens, rollout.tokens)  # the seeds fix the samples

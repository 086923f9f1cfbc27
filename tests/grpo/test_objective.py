"""The GRPO objective against hand computations on a fixed batch: group advantages (std-scaled, batch-scaled,
Dr. GRPO's unscaled), the clipped ratio, the k3 KL, the three loss types; and the num_iterations=1, beta=0
case, whose ratio is exactly 1 and whose gradient is REINFORCE's with the group-mean baseline."""

from __future__ import annotations

import math

import pytest
import torch

from archifactory.config.compose import compose
from archifactory.grpo.objective import group_advantages, k3_kl, policy_loss, zero_spread_fraction
from archifactory.grpo.rollout import sample, sequence_logps
from archifactory.model.build import build_model

REWARDS = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0]  # two groups of G=3
G = 3


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # unbiased, as torch.std


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor(REWARDS)
    first = REWARDS[:3]  # the second group's rewards are all equal
    m1, s1 = sum(first) / 3, _std(first)
    expected_group = [(r - m1) / (s1 + 1e-4) for r in first] + [0.0, 0.0, 0.0]  # equal rewards: 0, not 0/0
    torch.testing.assert_close(group_advantages(rewards, G, "group"), torch.tensor(expected_group))
    centred = [r - m1 for r in first] + [0.0, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, G, "none"), torch.tensor(centred))  # Dr. GRPO
    batch_std = _std(REWARDS)
    torch.testing.assert_close(
        group_advantages(rewards, G, "batch"), torch.tensor([c / (batch_std + 1e-4) for c in centred])
    )
    assert zero_spread_fraction(rewards, G) == 0.5


# a fixed batch: N=3 completions of lengths 3, 1, 2 (C=3), hand-picked log-probs
LOGP = [[-1.0, -0.5, -2.0], [-0.1, 0.0, 0.0], [-0.7, -1.2, 0.0]]
OLD = [[-1.3, -0.5, -1.5], [-0.6, 0.0, 0.0], [-0.7, -1.0, 0.0]]
REF = [[-1.1, -0.4, -2.5], [-0.2, 0.0, 0.0], [-0.9, -1.2, 0.0]]
MASK = [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
ADV = [1.0, -2.0, 0.5]
EPS, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.05, 4


def _hand_token_losses(beta: float) -> list[list[float]]:
    losses = []
    for i in range(3):
        row = []
        for t in range(3):
            ratio = math.exp(LOGP[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - EPS), 1 + EPS_HIGH)
            loss = -min(ratio * ADV[i], clipped * ADV[i])
            delta = REF[i][t] - LOGP[i][t]
            row.append(loss + beta * (math.exp(delta) - delta - 1))
        losses.append(row)
    return losses


@pytest.mark.parametrize("beta", [0.0, BETA])
def test_three_loss_types_and_kl_by_hand(beta: float) -> None:
    tokens = _hand_token_losses(beta)
    masked = [[tokens[i][t] for t in range(3) if MASK[i][t]] for i in range(3)]
    expected = {
        "grpo": sum(sum(row) / len(row) for row in masked) / 3,
        "dapo": sum(sum(row) for row in masked) / sum(len(row) for row in masked),
        "dr_grpo": sum(sum(row) for row in masked) / (3 * MAX_LEN),
    }
    for loss_type, value in expected.items():
        parts = policy_loss(
            torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK, dtype=torch.bool),
            epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type, max_completion_length=MAX_LEN,
            beta=beta, ref_logp=torch.tensor(REF),
        )  # fmt: skip
        assert float(parts.loss) == pytest.approx(value, rel=1e-6), loss_type
    kl = [math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1 for i in range(3) for t in range(3)]
    torch.testing.assert_close(k3_kl(torch.tensor(LOGP), torch.tensor(REF)).flatten(), torch.tensor(kl))
    assert all(k >= 0 for k in kl)
    if beta:
        kept = [kl[i * 3 + t] for i in range(3) for t in range(3) if MASK[i][t]]
        assert float(parts.kl) == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    # clipped tokens: row 0 t0 ratio e^0.3=1.35 > 1.28 with A>0; row 1 ratio e^0.5 with A<0 is not below 0.8
    assert float(parts.clip_fraction) == pytest.approx(1 / 6)


def test_one_iteration_without_kl_is_reinforce_with_a_group_baseline() -> None:
    cfg = compose(["model=tiny", "model.hidden_size=32", "model.num_layers=2", "trainer.seq_len=64"])
    model = build_model(cfg, 40).train()
    prompts = [[1, 2, 3]] * G + [[4, 5, 6]] * G
    rollout = sample(model, prompts, 6, 1.0, 1.0, [7], 0, list(range(2 * G)))
    advantages = group_advantages(torch.tensor(REWARDS), G, "group")
    logp, _ = sequence_logps(model, rollout, 1.0)
    assert torch.equal(torch.exp(logp - logp.detach()), torch.ones_like(logp))  # the ratio, exactly 1
    parts = policy_loss(logp, logp.detach(), advantages, rollout.mask, epsilon=EPS, epsilon_high=None,
                        loss_type="grpo", max_completion_length=6)  # fmt: skip
    ours = torch.autograd.grad(parts.loss, list(model.parameters()))
    mask = rollout.mask.float()
    logp, _ = sequence_logps(model, rollout, 1.0)
    reinforce = -((advantages[:, None] * logp * mask).sum(-1) / mask.sum(-1)).mean()
    theirs = torch.autograd.grad(reinforce, list(model.parameters()))
    assert any(g.abs().sum() > 0 for g in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(parts.clip_fraction) == 0.0

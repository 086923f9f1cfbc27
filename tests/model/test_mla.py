"""MLA beyond the shared contract: latent-only cache, sdpa == reference, decoupled RoPE, init."""

from __future__ import annotations

import copy

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.build import build_model
from archifactory.model.components import build_positional, component_factory
from archifactory.model.init import init_weights
from archifactory.model.mixins.mla import MultiHeadLatentAttention
from archifactory.model.positional import PositionContext
from tests.helpers import compose_config

HIDDEN = 64


def build_mla(positional: str = "rope", overrides: tuple[str, ...] = (), hidden: int = HIDDEN):
    cfg = compose_config(
        [
            "mixin=mla",
            f"positional={positional}",
            f"model.hidden_size={hidden}",
            "model.num_heads=4",
            *overrides,
        ]
    )
    mixin = component_factory("mixin", cfg.mixin, hidden)(layer_idx=0).double()
    with torch.no_grad():
        for p in mixin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheme = build_positional(cfg.positional, hidden, max_seq_len=256).double()
    return mixin, scheme


def ctx(scheme, start: int, length: int) -> PositionContext:
    return PositionContext(scheme, start, length)


def test_state_holds_only_latent_and_rope_key() -> None:
    mixin, scheme = build_mla()
    # hidden 64 / 4 heads: head size 16, so r = 64 and d_r = 8 by default
    assert (mixin.kv_lora_rank, mixin.rope_dim) == (64, 8)
    state = mixin.init_state(2, torch.device("cpu"), torch.float64)
    x = torch.randn(2, 10, HIDDEN, dtype=torch.float64)
    _, state = mixin(x[:, :7], ctx(scheme, 0, 7), state)
    _, state = mixin(x[:, 7:], ctx(scheme, 7, 3), state)
    assert set(state) == {"c_kv", "k_rope"}
    assert state["c_kv"].shape == (2, 10, 64) and state["k_rope"].shape == (2, 10, 8)
    assert mixin.state_size(10) == 10 * (64 + 8) == sum(t[0].numel() for t in state.values())
    # far smaller than the full per-head K/V cache of the same attention: 2 * H * d_h per token
    assert mixin.state_size(10) < 2 * HIDDEN * 10


@pytest.mark.parametrize("positional", ["rope", "alibi", "none"])
@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_sdpa_equals_reference(positional: str, q_lora_rank: int) -> None:
    mixin, scheme = build_mla(positional, (f"mixin.q_lora_rank={q_lora_rank}", "mixin.backend=sdpa"))
    reference = copy.deepcopy(mixin)  # the same weights on the other path (one compose, not two)
    reference.backend = "reference"
    assert mixin.backend_name() == "sdpa" and reference.backend_name() == "reference"
    x = torch.randn(2, 12, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(mixin(x, ctx(scheme, 0, 12))[0], reference(x, ctx(scheme, 0, 12))[0])
    # the absorbed decode form, both backends
    states = [m.init_state(2, torch.device("cpu"), torch.float64) for m in (mixin, reference)]
    outs = [m(x, ctx(scheme, 0, 12), s)[0] for m, s in zip((mixin, reference), states)]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_forward_equals_prefill_plus_decode_with_options(positional: str) -> None:
    overrides = (
        "mixin.q_lora_rank=16",
        "mixin.kv_lora_rank=20",
        "mixin.qk_rope_head_dim=6",
        "mixin.v_head_dim=12",
    )
    mixin, scheme = build_mla(positional, overrides)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    full = mixin(x, ctx(scheme, 0, 9))[0]
    state = mixin.init_state(2, torch.device("cpu"), torch.float64)
    first, state = mixin(x[:, :4], ctx(scheme, 0, 4), state)
    steps = [first]
    for t in range(4, 9):
        out, state = mixin(x[:, t : t + 1], ctx(scheme, t, 1), state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-7, atol=1e-9)
    assert state["c_kv"].shape == (2, 9, 20) and state["k_rope"].shape == (2, 9, 6)


@pytest.mark.parametrize("positional", ["rope", "none"])
def test_decoupled_rope_encodes_relative_position(positional: str) -> None:
    """Shifting every position by the same offset leaves the output unchanged (scores depend on i - j
    only); changing the gaps between positions changes it (the rope parts do carry position)."""
    mixin, scheme = build_mla(positional)
    x = torch.randn(1, 10, HIDDEN, dtype=torch.float64)
    base = mixin(x, ctx(scheme, 0, 10))[0]
    shifted = mixin(x, ctx(scheme, 37, 10))[0]
    # rope angles are computed in fp32 (positional.py), hence the fp32-level tolerance
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-6)
    assert (shifted - base).abs().max() < 1e-6
    # the same tokens with a gap of 20 positions between the first five and the last five
    state = mixin.init_state(1, torch.device("cpu"), torch.float64)
    _, state = mixin(x[:, :5], ctx(scheme, 0, 5), state)
    gapped, _ = mixin(x[:, 5:], ctx(scheme, 25, 5), state)
    assert (gapped - base[:, 5:]).abs().max() > 1e-2


def test_positional_rope_theta_is_used_and_rope_theta_otherwise() -> None:
    x = torch.randn(1, 8, HIDDEN, dtype=torch.float64)
    outputs = {}
    for positional, extra in [
        ("rope", ()),
        ("rope", ("positional.theta=500.0",)),
        ("none", ()),
        ("none", ("mixin.rope_theta=500.0",)),
    ]:
        torch.manual_seed(1)
        mixin, scheme = build_mla(positional, extra)
        outputs[(positional, extra)] = mixin(x, ctx(scheme, 0, 8))[0]
    rope, rope_500, none, none_500 = outputs.values()
    torch.testing.assert_close(rope, none)  # same theta, same rotation
    torch.testing.assert_close(rope_500, none_500)
    assert not torch.allclose(rope, rope_500)


def test_every_parameter_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Construction must not leave uninitialised memory: poison torch.empty with NaN while building."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    mixin = MultiHeadLatentAttention(HIDDEN, layer_idx=0, num_heads=4, q_lora_rank=16)
    monkeypatch.setattr(torch, "empty", real_empty)
    for name, p in mixin.named_parameters():
        assert torch.isfinite(p).all(), f"{name} holds uninitialised memory after construction"

    init_weights(mixin, initializer_range=0.02, num_layers=4)
    for name, p in mixin.named_parameters():
        if name.endswith("norm.weight"):  # RMSNorm: documented constant init 1
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # every other parameter is a Linear weight the model's scheme re-draws
            expected = 0.02 / (2 * 4) ** 0.5 if name.startswith("out_proj") else 0.02
            assert abs(p.std().item() - expected) < 0.25 * expected, name
            assert abs(p.mean().item()) < 0.25 * expected, name
    assert {n for n, _ in mixin.named_parameters()} == {
        "q_down.weight",
        "q_norm.weight",
        "q_up.weight",
        "kv_down.weight",
        "kv_norm.weight",
        "kv_up.weight",
        "out_proj.weight",
    }


def test_builds_as_a_model() -> None:
    cfg = compose_config(
        ["mixin=mla", f"model.hidden_size={HIDDEN}", "model.num_heads=4", "model.num_layers=2"]
    )
    model = build_model(cfg, vocab_size=97)
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, targets=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    head = HIDDEN // 4
    assert model.decode_state_size(16) == 2 * 16 * (4 * head + head // 2)
    mixin_params = sum(p.numel() for b in model.blocks for p in b.mixin.parameters())
    assert model.flops_per_token(16) > 2 * mixin_params


def test_norm_eps_reaches_both_latent_norms() -> None:
    """mixin.norm_eps=1e-6 (DeepSeek's rms_norm_eps): the cached latent c_kv and the query latent are
    RMS-normed with that epsilon, visible on a small-scale input where eps matters."""
    mixin, scheme = build_mla(overrides=("mixin.q_lora_rank=24", "mixin.norm_eps=1e-6"))
    x = 1e-3 * torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    _, state = mixin(x, ctx(scheme, 0, 5), mixin.init_state(2, torch.device("cpu"), torch.float64))
    latent = mixin.kv_down(x)[..., : mixin.kv_lora_rank]
    expected = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + 1e-6) * mixin.kv_norm.weight
    torch.testing.assert_close(state["c_kv"], expected)
    q_latent = mixin.q_down(x)
    expected_q = q_latent * torch.rsqrt(q_latent.pow(2).mean(-1, keepdim=True) + 1e-6) * mixin.q_norm.weight
    torch.testing.assert_close(mixin.q_norm(q_latent), expected_q)
    default, _ = build_mla(overrides=("mixin.q_lora_rank=24",))
    assert default.kv_norm.eps == default.q_norm.eps == 1e-5


def test_bad_norm_eps_is_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="use a positive epsilon"):
        MultiHeadLatentAttention(HIDDEN, 0, norm_eps=0.0)

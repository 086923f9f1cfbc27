"""The component contract (docs/architecture.md), parametrized over every registered mixin and FFN.

Each component is built from its own YAML in `configs/` (so the config and the class are tested
together) at hidden 64 / 4 heads, with every parameter perturbed away from its init so that equivalence
checks cannot pass vacuously (zero-initialised adapters, zero output projections, ...).
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import DictConfig

from archifactory.config.compose import group_options
from archifactory.core.registry import components
from archifactory.model.components import build_positional, component_factory
from archifactory.model.positional import PositionContext
from tests.helpers import compose_config

HIDDEN = 64
MIXINS = sorted(components("mixin"))
FFNS = sorted(components("ffn"))


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@functools.cache
def component_config(kind: str, name: str) -> DictConfig:
    """`kind=name`'s composed config node, read (never changed) by the builds below: a component's options do
    not depend on the positional scheme, so one composition per component (and one per scheme) serves every
    case of the suites."""
    return compose_config([f"{kind}={name}", f"model.hidden_size={HIDDEN}", "model.num_heads=4"])[kind]


def build(
    kind: str, name: str, positional: str = "rope", layer_idx: int = 1
) -> tuple[torch.nn.Module, PositionContext]:
    module = component_factory(kind, component_config(kind, name), HIDDEN)(layer_idx=layer_idx).double()
    perturb(module)
    scheme = build_positional(component_config("positional", positional), HIDDEN, max_seq_len=64).double()
    return module, PositionContext(scheme, 0, 0)


def ctx_for(ctx: PositionContext, start: int, length: int) -> PositionContext:
    return PositionContext(ctx.scheme, start, length)


def run_mixin(mixin, ctx, x, state=None, start=0):
    return mixin(x, ctx_for(ctx, start, x.shape[1]), state)


def test_every_component_has_a_config() -> None:
    assert set(MIXINS) <= set(group_options("mixin")), (
        "every registered mixin needs configs/mixin/<name>.yaml"
    )
    assert set(FFNS) <= set(group_options("ffn")), "every registered FFN needs configs/ffn/<name>.yaml"
    assert set(components("positional")) == set(group_options("positional"))


def test_every_component_has_a_docstring() -> None:
    for kind in ("mixin", "ffn", "positional"):
        for name, cls in components(kind).items():
            assert cls.__doc__ and len(cls.__doc__.strip()) > 40, f"{kind}={name} needs a docstring"


@pytest.mark.parametrize("name", MIXINS)
def test_mixin_shapes_and_gradients(name: str) -> None:
    mixin, ctx = build("mixin", name)
    x = torch.randn(2, 11, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, state = run_mixin(mixin, ctx, x)
    assert y.shape == x.shape and y.dtype == x.dtype and state is None
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in mixin.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


@pytest.mark.parametrize("name", MIXINS)
def test_mixin_causal(name: str) -> None:
    mixin, ctx = build("mixin", name)
    x = torch.randn(2, 16, HIDDEN, dtype=torch.float64)
    y = run_mixin(mixin, ctx, x)[0]
    x2 = x.clone()
    x2[:, 9:] += torch.randn_like(x2[:, 9:])
    y2 = run_mixin(mixin, ctx, x2)[0]
    torch.testing.assert_close(y2[:, :9], y[:, :9], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(y2[:, 9:], y[:, 9:])


@pytest.mark.parametrize("name", MIXINS)
def test_mixin_batch_independent(name: str) -> None:
    mixin, ctx = build("mixin", name)
    x = torch.randn(3, 12, HIDDEN, dtype=torch.float64)
    y = run_mixin(mixin, ctx, x)[0]
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])
    y2 = run_mixin(mixin, ctx, x2)[0]
    torch.testing.assert_close(y2[0], y[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y2[2], y[2], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(y2[1], y[1])


# learned and sinusoidal positions are added to the embeddings (model level): inside a mixin they are `none`
# (no rotation, no bias), so the three mixin-level cases are none, rope and alibi
@pytest.mark.parametrize("positional", ["none", "rope", "alibi"])
@pytest.mark.parametrize("name", MIXINS)
@pytest.mark.parametrize("seq_len,prefill", [(13, 5), (16, 8), (7, 0)])
def test_mixin_forward_equals_prefill_plus_decode(
    name: str, positional: str, seq_len: int, prefill: int
) -> None:
    mixin, ctx = build("mixin", name, positional)
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64)
    full = run_mixin(mixin, ctx, x)[0]
    state = mixin.init_state(2, torch.device("cpu"), torch.float64)
    outputs = []
    if prefill:
        out, state = run_mixin(mixin, ctx, x[:, :prefill], state, start=0)
        outputs.append(out)
    for t in range(prefill, seq_len):
        out, state = run_mixin(mixin, ctx, x[:, t : t + 1], state, start=t)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", MIXINS)
def test_mixin_accounting(name: str) -> None:
    mixin, _ = build("mixin", name)
    # every weight matrix multiplies each token at least once: 2 FLOPs per matrix entry, even at T=1
    matrix_params = sum(p.numel() for p in mixin.parameters() if p.dim() >= 2)
    assert mixin.flops_per_token(1) >= 2 * matrix_params, "FLOPs must count every projection"
    assert mixin.flops_per_token(4096) >= mixin.flops_per_token(256)
    assert 0 < mixin.state_size(256) <= mixin.state_size(4096)
    state = mixin.init_state(1, torch.device("cpu"), torch.float64)
    x = torch.randn(1, 32, HIDDEN, dtype=torch.float64)
    _, state = run_mixin(mixin, build("mixin", name)[1], x, state)
    assert sum(t.numel() for t in state.values()) == mixin.state_size(32)


@pytest.mark.parametrize("name", FFNS)
def test_ffn_contract(name: str) -> None:
    ffn, _ = build("ffn", name)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, aux = ffn(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    loss = y.pow(2).sum() + aux.get("loss", 0)
    loss.backward()
    for pname, p in ffn.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    # perturb token 4 of sequence 1: the other sequence (batch independence) and the earlier tokens of
    # the same sequence (causality) are unchanged. Not "every other token": rwkv_cmix's token shift feeds
    # token 4 into token 5.
    x2 = x.detach().clone()
    x2[1, 4] += 1.0
    y2 = ffn(x2)[0]
    torch.testing.assert_close(y2[0], y[0].detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y2[1, :4], y[1, :4].detach(), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(y2[1, 4], y[1, 4].detach())
    assert ffn.flops_per_token() > 0 and 0 < ffn.active_parameters() <= sum(
        p.numel() for p in ffn.parameters()
    )

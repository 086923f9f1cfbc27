"""model.value_residual (`archifactory/model/value_residual.py`): off it is today's model; on, the first
value-declaring layer's values reach every later one through the call's context, with a learned gate
(ResFormer) or RWKV-7's data-dependent one; decode, document masking, compile, accounting and refusals."""

from __future__ import annotations

import pytest
import torch

from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.documents import DocumentLayout
from archifactory.model.mixins.base import Mixin
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.model.value_residual import ValueResidual
from tests.helpers import compose_config

V = 64
SHAPE = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=3", f"model.vocab_size={V}"]


def config(mixin: str, *extra: str):
    return compose_config([*SHAPE, f"mixin={mixin}", "model.value_residual=true", *extra])


def gates(model: StackedMixinForCausalLM) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".value_residual." in name}


def model_for(mixin: str, *extra: str, seed: int = 0) -> StackedMixinForCausalLM:
    """Gates moved off their init (RWKV-7's W_a starts at zero), so equivalences cannot pass vacuously."""
    torch.manual_seed(seed)
    model = build_model(config(mixin, *extra), V)
    with torch.no_grad():
        for p in gates(model).values():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def declaring_mixins() -> list[str]:
    """Every registered mixin whose class declares values (overrides `Mixin.value_gate`): a newcomer that
    declares gets these tests. Read from the classes, not from built layers: this runs at collection, in
    every xdist worker, where composing each mixin's config cost 12 s."""
    return sorted(name for name, cls in components("mixin").items() if cls.value_gate is not Mixin.value_gate)


DECLARING = declaring_mixins()


def test_the_expected_mixins_declare_values() -> None:
    assert {"gqa", "deltanet", "gated_deltanet", "kda", "comba", "gated_deltaproduct", "rwkv7"} <= set(
        DECLARING
    )


def test_off_is_todays_model() -> None:
    ids = torch.randint(0, V, (2, 9))
    torch.manual_seed(0)
    default = build_model(compose_config(SHAPE), V)
    torch.manual_seed(0)
    off = build_model(compose_config([*SHAPE, "model.value_residual=false"]), V)
    assert list(off.state_dict()) == list(default.state_dict()) and not gates(off)
    assert all(b.mixin.value_residual is None for b in off.blocks)
    assert torch.equal(off(ids).logits, default(ids).logits)
    assert cfg_variant_label(compose_config(SHAPE)) == "gqa"


@pytest.mark.parametrize("mixin", ["gqa", "rwkv7"])
def test_a_saturated_gate_uses_the_first_layers_values_and_a_closed_one_its_own(mixin: str) -> None:
    """Gate logits of +60 (σ = 1 in float64 to 1e-26): layer 1 sees only layer 0's values, so its own value
    projection no longer matters. −60: layer 1 uses its own values, as the model without the option."""
    model = model_for(mixin, "model.num_layers=2")
    ids = torch.randint(0, V, (2, 9))
    gate = model.blocks[1].mixin.value_residual
    value_weight = (
        model.blocks[1].mixin.qkv_proj.weight if mixin == "gqa" else model.blocks[1].mixin.v_proj.weight
    )
    rows = slice(value_weight.shape[0] - gate.width, None)  # gqa: v is the last kv_size rows of qkv_proj
    with torch.no_grad():
        for p in gates(model).values():
            p.fill_(60.0 if p.dim() == 1 else 0.0)  # λ or v₀ = 60; RWKV-7's low-rank part off
        base = model(ids).logits
        value_weight[rows] += torch.randn_like(value_weight[rows])
        assert torch.allclose(model(ids).logits, base, rtol=0, atol=1e-12), "layer 1's own values leaked in"
        for p in gates(model).values():
            p.fill_(-60.0 if p.dim() == 1 else 0.0)
        closed = model(ids).logits
        for block in model.blocks:
            block.mixin.value_residual = None
        torch.testing.assert_close(closed, model(ids).logits, rtol=0, atol=1e-12)
        assert not torch.allclose(closed, base)


@pytest.mark.parametrize("mixin", DECLARING)
def test_every_declaring_mixin_stores_and_mixes(mixin: str) -> None:
    """The first layer stores (no weights), every later one has a gate that gets a gradient: a mixin that
    declares values but never calls `mix_first_values` fails here."""
    model = model_for(mixin).float().train()
    first, *later = [b.mixin.value_residual for b in model.blocks]
    assert isinstance(first, ValueResidual) and first.first and not list(first.parameters())
    assert later and all(not g.first and list(g.parameters()) for g in later)
    ids = torch.randint(0, V, (2, 9))
    model(ids, targets=ids.roll(-1, 1)).loss.backward()
    for name, p in gates(model).items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("mixin", ["gqa", "gated_deltanet", "rwkv7"])
def test_decode_equals_full_forward(mixin: str) -> None:
    model = model_for(mixin)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], state=model.init_state(2))
        pieces = [out.logits]
        for t in range(4, 9):
            out = model(ids[:, t : t + 1], state=out.state)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixin", ["gqa", "gated_deltanet"])
def test_document_masking_equals_each_document_alone(mixin: str) -> None:
    model = model_for(mixin, "positional=learned")
    first, second = torch.tensor([5, 6, 7, 0]), torch.tensor([8, 9, 10, 11, 12])
    ids = torch.cat([first, second]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, documents=DocumentLayout.from_ids(ids, 0)).logits
        alone = torch.cat([model(first[None]).logits, model(second[None]).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)


def test_a_hybrid_mixes_from_its_first_declaring_layer() -> None:
    model = build_model(
        config("gqa", "model.layer_pattern=[mamba2,gqa,{name: gated_deltanet, expand_v: 1}]"), V
    )
    residuals = [b.mixin.value_residual for b in model.blocks]
    assert residuals[0] is None and residuals[1].first and not residuals[2].first


def test_refusals_are_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="no layer's mixin"):
        build_model(config("mamba2"), V)
    with pytest.raises(ArchiFactoryError, match="values 64 wide"):
        build_model(config("gqa", "model.layer_pattern=[gqa,gated_deltanet]"), V)


def test_accounting_and_label() -> None:
    model = build_model(config("rwkv7"), V)
    off = build_model(compose_config([*SHAPE, "mixin=rwkv7"]), V)
    breakdown = model.parameter_breakdown()
    assert breakdown["total"] == sum(p.numel() for p in model.parameters())
    added = sum(p.numel() for p in gates(model).values())
    assert added > 0 and breakdown["mixin"] == off.parameter_breakdown()["mixin"] + added
    assert model.flops_per_token(16) > off.flops_per_token(16)
    cfg = config("gqa", "residual=mhc")
    assert cfg_variant_label(cfg) == "gqa[residual=mhc,value_residual]"
    assert cfg.run_name.startswith("gqa-mhc-vres_swiglu")


def test_compile_clean() -> None:
    model = build_model(config("gqa", "model.max_seq_len=64"), V)
    ids = torch.randint(0, V, (2, 12))
    torch._dynamo.reset()
    try:
        results = [torch._dynamo.explain(model)(ids, targets=ids)]
        with torch.no_grad():
            state = model(ids[:1, :5], state=model.init_state(1)).state
            results.append(torch._dynamo.explain(model)(ids[:1, 5:6], state=state))
    finally:
        torch._dynamo.reset()
    for result in results:
        assert result.graph_break_count == 0, [str(b) for b in result.break_reasons]


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """Recomputing a block in backward stores the first layer's values again; the gradients must not change."""
    model = model_for("gqa").float().train()
    ids = torch.randint(0, V, (2, 9))
    grads = []
    for checkpointing in (False, True):
        for block in model.blocks:
            block.activation_checkpointing = checkpointing
        model.zero_grad()
        model(ids, targets=ids.roll(-1, 1)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)

"""Routed FFNs under torch.compile: the static-capacity slot dispatch equals the dropless sorted path when
nothing is dropped (outputs, gradients, aux), drops exactly what the sorted path drops when capacity binds,
and `auto` picks a layout with static shapes whenever it is compiled.

(0 graph breaks for every registered FFN in a built model: `tests/model/test_compile.py`.)
"""

from __future__ import annotations

import pytest
import torch

from archifactory.model.build import build_model
from archifactory.model.ffn._moe_dispatch import plan_dispatch, slot_dispatch, sort_by_expert, uses_slots
from archifactory.model.ffn.base import FeedForward
from archifactory.model.ffn.dora_moe import DoRAMoE
from archifactory.model.ffn.hyper_moe import HyperMoE
from archifactory.model.ffn.moe import MoE
from tests.helpers import compose_config
from tests.model.test_compile import SHAPE, reasons

ROUTED = {
    "moe": lambda **kw: MoE(16, 0, num_experts=8, top_k=2, multiple_of=8, num_shared_experts=1, **kw),
    "dora_moe": lambda **kw: DoRAMoE(16, 0, num_experts=8, top_k=2, rank=4, multiple_of=8, **kw),
    "hyper_moe": lambda **kw: HyperMoE(16, 0, num_experts=8, top_k=2, multiple_of=8, adapter_dim=4, **kw),
}


def perturbed(layer: FeedForward) -> FeedForward:
    """fp64, every parameter moved off its init (DoRA's B and HyperMoE's generator start at zero)."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


def run(
    layer: FeedForward, x: torch.Tensor, forward: torch.nn.Module | None = None
) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    """Output, aux, input gradient and parameter gradients of one forward/backward (aux loss included);
    `forward`: what to call instead of the layer (its compiled wrapper)."""
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    y, aux = (layer if forward is None else forward)(x)
    (y.pow(2).sum() + aux["loss"]).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), {k: v.detach() for k, v in aux.items()}, x.grad, grads


def assert_same(got: tuple, want: tuple) -> None:
    y, aux, x_grad, grads = got
    torch.testing.assert_close(y, want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_grad, want[2], rtol=1e-10, atol=1e-12)
    assert grads.keys() == want[3].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[3][name], rtol=1e-10, atol=1e-12, msg=name)
    for key in ("loss", "aux_loss", "z_loss", "load", "imbalance", "dropped"):
        torch.testing.assert_close(aux[key], want[1][key], rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("name", sorted(ROUTED))
@pytest.mark.parametrize("capacity_factor", [None, 3.0])
def test_capacity_dispatch_without_drops_equals_the_dropless_loop(name: str, capacity_factor) -> None:
    """None: capacity = tokens; 3.0: a capacity below that which this routing never reaches."""
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    slots = perturbed(ROUTED[name](dispatch="capacity", capacity_factor=capacity_factor))
    got = run(slots, x)
    assert float(got[1]["dropped"]) == 0
    slots.dispatch, slots.capacity_factor = "loop", None  # the same weights, dropless per-expert reference
    assert_same(got, run(slots, x))


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_capacity_dispatch_drops_what_the_sorted_path_drops(name: str) -> None:
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    layer = perturbed(ROUTED[name](dispatch="capacity", capacity_factor=0.5))
    got = run(layer, x)
    assert float(got[1]["dropped"]) > 0
    layer.dispatch = "loop"  # sorted by expert, capacity applied by masking the sorted order
    assert_same(got, run(layer, x))


def test_slot_grid_holds_the_kept_assignments_in_order() -> None:
    torch.manual_seed(1)
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(11)])  # [11, 2], distinct per token
    weights = torch.rand(11, 2)
    for capacity in (2, 4, 11):
        sorted_ = sort_by_expert(indices, weights, 4, capacity)
        slots = slot_dispatch(indices, weights, 4, capacity)
        assert torch.equal(slots.counts, sorted_.counts) and int(slots.dropped) == int(sorted_.dropped)
        for e in range(4):
            n = int(slots.counts[e])
            assert torch.equal(slots.token_idx[e, :n], sorted_.token_idx[sorted_.expert_idx == e])
            assert torch.equal(slots.weights[e, :n], sorted_.weights[sorted_.expert_idx == e])
            assert torch.all(slots.weights[e, n:] == 0), "empty slots add nothing"


def test_auto_layout_is_static_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager dropless `auto` keeps the sorted path; a capacity factor or a compile that `_grouped_mm` cannot
    serve (fp32: its traced shape check takes bf16 only) takes the slot grid; bf16 compiles grouped."""
    cpu, widths = torch.device("cpu"), (16, 32, 16)
    assert not uses_slots("auto", None, torch.float32, cpu, widths)
    assert uses_slots("auto", 1.25, torch.float32, cpu, widths)
    assert uses_slots("capacity", None, torch.float32, cpu, widths)
    assert not uses_slots("grouped", 1.25, torch.float32, cpu, widths)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert uses_slots("auto", None, torch.float32, cpu, widths)
    assert uses_slots("auto", None, torch.bfloat16, cpu, (16, 36, 16)), "36 bf16 values: not 16-byte aligned"
    if hasattr(torch, "_grouped_mm"):
        assert not uses_slots("auto", None, torch.bfloat16, cpu, widths)
    indices = torch.tensor([[0, 1], [1, 2], [2, 0]])
    layout = plan_dispatch(
        indices, torch.rand(3, 2), torch.tensor([2, 2, 2]), None, "auto", torch.float32, widths
    )
    assert layout.slots and layout.token_idx.shape == (3, 3), "dropless slots: capacity = tokens"


def test_grouped_dropless_path_compiles_whole_in_bf16() -> None:
    """The exact dropless path (`_grouped_mm`, static M = tokens · k) in a bf16 model: no graph break."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    model = build_model(compose_config([*SHAPE, "mixin=gqa", "ffn=moe"]), 64).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    try:
        result = torch._dynamo.explain(model)(ids, targets=ids)
    finally:
        torch._dynamo.reset()
    assert result.graph_break_count == 0, "\n".join(reasons(result))


def test_compiled_slots_equal_eager() -> None:
    """torch.compile (aot_eager: Dynamo + AOTAutograd, no codegen) of the slot path, forward and backward."""
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    layer = perturbed(ROUTED["moe"](dispatch="auto", capacity_factor=None))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        got = run(layer, x, compiled)
    finally:
        torch._dynamo.reset()
    layer.dispatch = "loop"
    assert_same(got, run(layer, x))

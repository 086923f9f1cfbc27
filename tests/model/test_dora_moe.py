"""`dora_moe` against a hand-written per-token reference; zero adapters equal the base SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.ffn.dora_moe import DoRAMoE
from archifactory.model.init import init_weights


def perturb(module: torch.nn.Module, names: tuple[str, ...] | None = None, scale: float = 0.1) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name.split(".")[0] in names:
                p.add_(scale * torch.randn_like(p))


def reference(layer: DoRAMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: route by hand, materialise each chosen expert's DoRA weights, mix the hidden states."""
    base = layer.base
    out = []
    for token in x.reshape(-1, layer.hidden_size):
        scores = (layer.router.gate.weight @ token).softmax(-1)
        top = scores.topk(layer.top_k)
        weights = top.values / top.values.sum()
        hidden = torch.zeros(layer.intermediate_size, dtype=x.dtype)
        for weight, e in zip(weights, top.indices.tolist()):
            adapted = []
            for p, w0 in enumerate((base.gate_proj.weight, base.up_proj.weight)):  # [F, D]
                update = (layer.lora_a[p, e] @ layer.lora_b[p, e]).t()  # [F, D]
                merged = w0 + update
                magnitude = w0.norm(dim=1) + layer.magnitude_delta[p, e]
                adapted.append((magnitude / merged.norm(dim=1)).unsqueeze(1) * merged)
            hidden = hidden + weight * F.silu(adapted[0] @ token) * (adapted[1] @ token)
        out.append(base.out_proj.weight @ hidden)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("dispatch", ["loop", "batched"])
def test_equals_hand_written_reference(dispatch: str) -> None:
    layer = DoRAMoE(8, 0, num_experts=3, top_k=2, rank=2, intermediate_multiplier=2.0, multiple_of=4,
                    dispatch=dispatch).double()  # fmt: skip
    perturb(layer)  # B and the magnitude offsets become non-zero: the adapters matter
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-10, atol=1e-12)
    assert int(aux["load"].numel()) == 3 and float(aux["dropped"]) == 0


def test_zero_adapters_equal_the_base_swiglu_even_after_the_init_scheme() -> None:
    layer = DoRAMoE(16, 0, num_experts=4, top_k=2, rank=4, multiple_of=8).double()
    init_weights(layer, 0.02, 4)  # the model re-draws the base after construction
    perturb(layer, names=("base", "router", "lora_a"))  # B = 0, magnitude offsets = 0
    assert torch.count_nonzero(layer.lora_b) == 0
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    base = layer.base
    expected = base.out_proj(F.silu(base.gate_proj(x)) * base.up_proj(x))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(y.pow(2).sum(), (x, base.gate_proj.weight))
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (x, base.gate_proj.weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_accounting() -> None:
    layer = DoRAMoE(64, 0)
    d, f, r = 64, layer.intermediate_size, 8
    per_expert = 2 * (d * r + r * f + f)
    assert layer.adapter_parameters() == per_expert
    assert sum(p.numel() for p in layer.parameters()) == 3 * d * f + 8 * d + 8 * per_expert
    assert layer.active_parameters() == 3 * d * f + 8 * d + 2 * per_expert
    assert layer.flops_per_token() == 6 * d * f + 2 * d * 8 + 2 * 4 * (d * r + r * f)

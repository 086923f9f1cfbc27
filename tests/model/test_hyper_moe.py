"""`hyper_moe` against a hand-written per-token reference; a zero generator reduces it to its base MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.ffn.hyper_moe import HyperMoE
from archifactory.model.ffn.moe import MoE

OPTIONS = dict(num_experts=4, top_k=2, intermediate_multiplier=1.0, multiple_of=4)


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def reference(layer: HyperMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: route, run the chosen experts, then build the HyperExpert's matrices explicitly from
    the mean embedding of the experts that were not chosen."""
    d, b, width = layer.hidden_size, layer.adapter_dim, layer.intermediate_size
    out = []
    for token in x.reshape(-1, d):
        scores = (layer.router.gate.weight @ token).softmax(-1)
        top = scores.topk(layer.top_k)
        y = torch.zeros(d, dtype=x.dtype)
        for weight, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            gate, up = token @ layer.w_in[e, :, :width], token @ layer.w_in[e, :, width:]
            y = y + weight * ((F.silu(gate) * up) @ layer.w_out[e])
        others = [e for e in range(layer.num_experts) if e not in top.indices.tolist()]
        cond = (
            layer.expert_embedding[others].mean(0)
            if others
            else torch.zeros(layer.embedding_dim, dtype=x.dtype)
        )
        h = F.relu(layer.hyper_in.weight @ cond + layer.hyper_in.bias)
        down = (layer.gen_down.weight @ h + layer.gen_down.bias).view(d, b)
        up_w = (layer.gen_up.weight @ h + layer.gen_up.bias).view(b, d)
        out.append(y + up_w.t() @ F.relu(down.t() @ token))
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("dispatch", ["loop", "batched"])
def test_equals_hand_written_reference(dispatch: str) -> None:
    layer = HyperMoE(
        8, 0, **OPTIONS, dispatch=dispatch, adapter_dim=3, embedding_dim=5, hypernet_dim=6
    ).double()
    perturb(layer)  # the up-generator becomes non-zero: the HyperExpert matters
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-10, atol=1e-12)
    assert set(aux) == {"loss", "aux_loss", "z_loss", "load", "imbalance", "dropped"}


def test_zero_generator_equals_the_base_moe() -> None:
    layer = HyperMoE(16, 0, **OPTIONS).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("gen_up"):
                p.add_(0.1 * torch.randn_like(p))
    base = MoE(16, 0, **OPTIONS).double()
    base.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], base(x)[0], rtol=1e-12, atol=1e-14)


def test_single_expert_with_zero_generator_is_a_swiglu() -> None:
    layer = HyperMoE(16, 0, num_experts=1, top_k=1, multiple_of=8).double()
    with torch.no_grad():
        layer.w_in.add_(0.1 * torch.randn_like(layer.w_in))
    x = torch.randn(3, 16, dtype=torch.float64)
    width = layer.intermediate_size
    expected = (F.silu(x @ layer.w_in[0, :, :width]) * (x @ layer.w_in[0, :, width:])) @ layer.w_out[0]
    torch.testing.assert_close(layer(x.unsqueeze(0))[0][0], expected, rtol=1e-12, atol=1e-14)
    assert torch.count_nonzero(layer.condition(torch.zeros(3, 1, dtype=torch.long), torch.float64)) == 0


def test_accounting_adds_the_hypernetwork_to_the_base_moe() -> None:
    layer, base = HyperMoE(64, 0), MoE(64, 0)
    hyper = layer.hyper_parameters()
    assert hyper == (32 * 16 + 16) + 2 * (16 * 64 * 16 + 64 * 16)
    assert layer.active_parameters() == base.active_parameters() + 6 * 32 + hyper
    assert layer.flops_per_token() > base.flops_per_token()


def test_model_init_keeps_the_generator_zero_so_the_layer_starts_as_its_base_moe() -> None:
    """Through the model's init pass (`model/init.py`), not just the constructor: the declared `keep` must hold."""
    from archifactory.model.build import build_model
    from tests.helpers import compose_config

    cfg = compose_config(["ffn=hyper_moe", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4"])
    model = build_model(cfg, vocab_size=64)
    for block in model.blocks:
        layer = block.ffn
        assert isinstance(layer, HyperMoE)
        assert torch.count_nonzero(layer.gen_up.weight) == 0 and torch.count_nonzero(layer.gen_up.bias) == 0
        assert layer.gen_down.weight.std() < 0.05, "the other generator Linear does get the init scheme"
        x = torch.randn(2, 5, 32)
        assert torch.count_nonzero(layer.hyper_expert(x.view(-1, 32), torch.tensor([[0, 1]] * 10))) == 0

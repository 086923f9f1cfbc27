"""`moe`: routing invariants, hand-computed mixtures and losses, aux-free balancing, dispatch, capacity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.model.components import component_factory
from archifactory.model.ffn._moe_dispatch import grouped_mm_supported, resolve_mode, sort_by_expert
from archifactory.model.ffn.moe import MoE
from archifactory.model.ffn.swiglu import SwiGLU
from tests.helpers import compose_config


def perturbed(
    module: torch.nn.Module, dtype: torch.dtype = torch.float64, scale: float = 0.1
) -> torch.nn.Module:
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def expert_by_hand(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    width = moe.intermediate_size
    gate, up = x @ moe.w_in[e, :, :width], x @ moe.w_in[e, :, width:]
    return (F.silu(gate) * up) @ moe.w_out[e]


def test_each_token_gets_k_distinct_experts() -> None:
    moe = perturbed(MoE(32, 0, num_experts=8, top_k=3))
    flat = torch.randn(40, 32, dtype=torch.float64)
    routing = moe.router(flat)
    assert routing.indices.shape == (40, 3)
    assert all(len(set(row.tolist())) == 3 for row in routing.indices)
    assert int(routing.counts.sum()) == 40 * 3
    dispatch = sort_by_expert(routing.indices, routing.weights, 8, capacity=None)
    assert int(dispatch.counts.sum()) == 40 * 3 and int(dispatch.dropped) == 0
    assert torch.equal(dispatch.counts, routing.counts)
    assert torch.all(dispatch.expert_idx[1:] >= dispatch.expert_idx[:-1]), "rows are grouped by expert"
    for t in range(40):
        assert sorted(dispatch.expert_idx[dispatch.token_idx == t].tolist()) == sorted(
            routing.indices[t].tolist()
        )


@pytest.mark.parametrize("dispatch", ["loop", "batched", "auto"])
@pytest.mark.parametrize(
    "score_func,renormalize,shared", [("softmax", False, 0), ("sigmoid", False, 1), ("sigmoid", True, 0)]
)
def test_top_k_equal_to_num_experts_is_the_dense_mixture(dispatch, score_func, renormalize, shared) -> None:
    moe = MoE(16, 0, num_experts=4, top_k=4, score_func=score_func, renormalize=renormalize,
              num_shared_experts=shared, dispatch=dispatch, multiple_of=8)  # fmt: skip
    moe = perturbed(moe)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y, aux = moe(x)
    flat = x.reshape(-1, 16)
    logits = flat @ moe.router.gate.weight.t()
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    if renormalize:
        scores = scores / scores.sum(-1, keepdim=True)
    expected = sum(scores[:, e : e + 1] * expert_by_hand(moe, e, flat) for e in range(4))
    if shared:
        s = moe.shared
        expected = expected + s.out_proj(F.silu(s.gate_proj(flat)) * s.up_proj(flat))
    torch.testing.assert_close(y.reshape(-1, 16), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux["load"], torch.full((4,), 0.25, dtype=aux["load"].dtype))
    assert float(aux["imbalance"]) == pytest.approx(1.0) and float(aux["dropped"]) == 0


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_and_z_loss_equal_a_hand_computation(score_func: str) -> None:
    moe = MoE(
        4,
        0,
        num_experts=4,
        top_k=2,
        score_func=score_func,
        aux_loss_weight=0.3,
        z_loss_weight=0.07,
        multiple_of=4,
    )
    moe = moe.double()
    with torch.no_grad():
        moe.router.gate.weight.copy_(
            torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0.5]])
        )
    # a fixed routing: token t's two largest logits are known by construction
    x = torch.tensor(
        [[1.0, 0.5, 0, 0], [1.0, 0, 0.9, 0], [0, 1.0, 0.8, 0], [0.2, 0, 0, 1.0], [1.0, 0.6, 0, 0]]
    )
    expected_top2 = [{0, 1}, {0, 2}, {1, 2}, {0, 3}, {0, 1}]
    routing = moe.router(x.double())
    assert [set(row.tolist()) for row in routing.indices] == expected_top2

    logits = [[w * v for w, v in zip((3.0, 2.0, 1.0, 0.5), row)] for row in x.tolist()]
    if score_func == "softmax":
        probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    else:
        sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits]
        probs = [[v / sum(row) for v in row] for row in sig]
    counts = [sum(e in chosen for chosen in expected_top2) for e in range(4)]  # [4, 3, 2, 1]
    f = [c / (5 * 2) for c in counts]
    p = [sum(row[e] for row in probs) / 5 for e in range(4)]
    aux_loss = 4 * sum(fe * pe for fe, pe in zip(f, p))
    z_loss = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 5

    _, aux = moe(x.double().unsqueeze(0))
    assert float(aux["aux_loss"]) == pytest.approx(aux_loss, rel=1e-12)
    assert float(aux["z_loss"]) == pytest.approx(z_loss, rel=1e-12)
    assert float(aux["loss"].detach()) == pytest.approx(0.3 * aux_loss + 0.07 * z_loss, rel=1e-12)
    assert aux["load"].tolist() == pytest.approx(f)
    assert float(aux["imbalance"]) == pytest.approx(max(f) * 4)
    assert aux["loss"].requires_grad and not aux["aux_loss"].requires_grad


def test_aux_loss_free_bias_moves_load_toward_uniform() -> None:
    torch.manual_seed(2)
    moe = MoE(
        8, 0, num_experts=4, top_k=1, bias_update_rate=0.01, aux_loss_weight=0.0, multiple_of=8
    ).double()
    with torch.no_grad():  # skewed: every token leans toward expert 0's router direction
        moe.router.gate.weight.copy_(torch.randn(4, 8, dtype=torch.float64))
    x = torch.randn(1, 128, 8, dtype=torch.float64) + 0.4 * moe.router.gate.weight[0].detach()

    moe.eval()
    before = float(moe(x)[1]["imbalance"])
    assert int(moe.router.expert_counts.sum()) == 0, "evaluation forwards must not count"
    moe.train()
    for _ in range(80):  # one training forward per optimizer step (the router is the part that counts)
        moe.router(x[0])
        assert int(moe.router.expert_counts.sum()) == 128
        moe.after_optimizer_step()
        assert int(moe.router.expert_counts.sum()) == 0
    moe.eval()
    after = float(moe(x)[1]["imbalance"])
    assert before > 3.0 and after < 1.5, (before, after)
    assert (
        moe.router.expert_bias[0] == moe.router.expert_bias.min() and "router.expert_bias" in moe.state_dict()
    )
    assert "router.expert_counts" not in moe.state_dict()


def test_bias_only_selects_and_is_off_by_default() -> None:
    moe = perturbed(MoE(8, 0, num_experts=4, top_k=2, renormalize=False, multiple_of=8))
    flat = torch.randn(6, 8, dtype=torch.float64)
    moe(flat.unsqueeze(0))
    moe.after_optimizer_step()
    assert torch.count_nonzero(moe.router.expert_bias) == 0
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    routing = moe.router(flat)
    assert torch.equal(routing.indices.sort(-1).values, torch.tensor([[0, 1]] * 6))
    scores = (flat @ moe.router.gate.weight.t()).softmax(-1)
    torch.testing.assert_close(routing.weights, scores.gather(1, routing.indices))


@pytest.mark.parametrize("dispatch", ["grouped", "batched"])
@pytest.mark.parametrize("capacity_factor,shared", [(None, 0), (0.75, 1)])
def test_dispatch_paths_equal_the_loop(dispatch: str, capacity_factor, shared: int) -> None:
    torch.manual_seed(2)
    moe = MoE(32, 0, num_experts=8, top_k=2, capacity_factor=capacity_factor, num_shared_experts=shared)
    moe = perturbed(moe, dtype=torch.float32)
    x = torch.randn(3, 17, 32, requires_grad=True)
    results = {}
    for mode in (dispatch, "loop"):
        moe.dispatch = mode
        moe.zero_grad()
        x.grad = None
        y, aux = moe(x)
        (y.pow(2).sum() + aux["loss"]).backward()
        results[mode] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()})
    y, x_grad, grads = results[dispatch]
    torch.testing.assert_close(y, results["loop"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, results["loop"][1], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, results["loop"][2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_grouped_mm_is_used_where_supported() -> None:
    w = torch.zeros(4, 16, 32)
    assert grouped_mm_supported(torch.zeros(3, 16), w) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_supported(torch.zeros(3, 16, dtype=torch.float64), w.double())
    assert resolve_mode("auto", torch.zeros(3, 16, dtype=torch.float64), w.double()) == "batched"


def test_auto_dispatch_takes_the_grouped_path_in_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dispatch: auto` (the configs' default) must reach `torch._grouped_mm` where it is supported."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    moe = perturbed(MoE(32, 0, num_experts=4, top_k=2, dispatch="auto"), dtype=torch.float32)
    x = torch.randn(2, 5, 32)
    y, _ = moe(x)
    assert len(calls) == 2, "one grouped matmul in, one out"
    moe.dispatch = "loop"
    torch.testing.assert_close(y, moe(x)[0], rtol=1e-5, atol=1e-6)
    assert len(calls) == 2, "the loop path does not use it"


def test_capacity_drops_and_counts() -> None:
    torch.manual_seed(3)
    moe = perturbed(MoE(16, 0, num_experts=4, top_k=2, capacity_factor=0.5, renormalize=False, multiple_of=8))
    with torch.no_grad():
        moe.router.gate.weight[0] += 2.0  # skew toward expert 0 so that it overflows
    x = torch.randn(1, 24, 16, dtype=torch.float64) + 0.5
    y, aux = moe(x)
    flat = x[0]
    routing = moe.router(flat)
    capacity = math.ceil(0.5 * 24 * 2 / 4)
    # by hand: first choices claim slots before second choices, earlier tokens before later ones
    used, expected = [0] * 4, torch.zeros_like(flat)
    for choice in range(2):
        for t in range(24):
            e = int(routing.indices[t, choice])
            if used[e] < capacity:
                used[e] += 1
                expected[t] += routing.weights[t, choice] * expert_by_hand(moe, e, flat[t : t + 1])[0]
    dropped = 48 - sum(used)
    assert dropped > 0 and float(aux["dropped"]) == dropped
    assert sum(max(0, int(c) - capacity) for c in routing.counts) == dropped
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-12)


def test_moe_every_interleaves_dense_layers_of_equal_active_size() -> None:
    layers = [MoE(64, i, num_shared_experts=1, moe_every=2) for i in range(4)]
    assert [layer.is_moe for layer in layers] == [False, True, False, True]
    dense, sparse = layers[0], layers[1]
    assert dense.dense.intermediate_size == 3 * sparse.intermediate_size
    assert dense.active_parameters() == sparse.active_parameters() - sparse.router.gate.weight.numel()
    assert dense.flops_per_token() == sparse.flops_per_token() - 2 * 64 * 8
    x = torch.randn(2, 3, 64)
    y, aux = dense(x)
    assert y.shape == x.shape and aux == {}
    dense.after_optimizer_step()  # no router: a no-op


@pytest.mark.parametrize("hidden", [64, 256])
def test_accounting_and_equal_active_parameters_with_swiglu(hidden: int) -> None:
    moe, dense = MoE(hidden, 0), SwiGLU(hidden, 0)
    router = hidden * 8
    assert sum(p.numel() for p in moe.parameters()) == router + 8 * 3 * hidden * moe.intermediate_size
    assert moe.active_parameters() == router + 2 * 3 * hidden * moe.intermediate_size
    assert moe.active_parameters() - router == dense.active_parameters()
    assert moe.flops_per_token() == dense.flops_per_token() + 2 * router


def test_fine_grained_experts_keep_active_and_total_parameters() -> None:
    coarse, fine = MoE(64, 0), MoE(64, 0, granularity=4)
    assert (fine.num_experts, fine.top_k, fine.intermediate_size) == (32, 8, coarse.intermediate_size // 4)
    router_growth = 64 * (32 - 8)
    assert fine.active_parameters() == coarse.active_parameters() + router_growth
    total = lambda m: sum(p.numel() for p in m.parameters())
    assert total(fine) == total(coarse) + router_growth
    y, aux = fine(torch.randn(2, 5, 64))
    assert y.shape == (2, 5, 64) and aux["load"].shape == (32,)


@pytest.mark.parametrize("name", ["geglu", "moe", "dora_moe", "hyper_moe"])
def test_new_ffn_configs_build_at_hidden_256(name: str) -> None:
    cfg = compose_config([f"ffn={name}", "model.hidden_size=256"])
    ffn = component_factory("ffn", cfg.ffn, 256)(layer_idx=0)
    y, _ = ffn(torch.randn(1, 4, 256))
    assert y.shape == (1, 4, 256) and ffn.flops_per_token() > 0

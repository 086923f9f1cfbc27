"""Optimizers: decay groups, Muon (+AdamW) and AdEMAMix against hand-computed steps, state round trips."""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from torch import nn

from archifactory.config.schema import TrainerConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import LearnedPositional
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.train.optim import (
    AdEMAMix,
    CombinedOptimizer,
    NewtonSchulzMuon,
    build_optimizer,
    classify_parameters,
)
from archifactory.train.schedule import build_scheduler

HIDDEN, VOCAB, SEQ = 32, 50, 16


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy machine OpenMP's spinning threads
    # make each step ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(tie: bool = False, bias: bool = True) -> StackedMixinForCausalLM:
    torch.manual_seed(0)
    return StackedMixinForCausalLM(
        num_layers=2,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        mixin_module=functools.partial(GroupedQueryAttention, hidden_size=HIDDEN, num_heads=4, bias=bias),
        ffn_module=functools.partial(SwiGLU, hidden_size=HIDDEN, multiple_of=8),
        positional_module=LearnedPositional(HIDDEN, SEQ),
        tie_embeddings=tie,
    )


def group_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in opt.param_groups]


@pytest.mark.parametrize("tie", [False, True])
def test_adamw_decays_only_linear_matrices(tie: bool) -> None:
    model = tiny_lm(tie=tie)
    opt = build_optimizer(model, TrainerConfig(optimizer="adamw", weight_decay=0.1), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    (decay_wd, decay), (no_decay_wd, no_decay) = group_names(model, opt)
    assert decay_wd == 0.1 and no_decay_wd == 0.0
    assert all(name.endswith("proj.weight") for name in decay - {"lm_head.weight"})
    assert ("lm_head.weight" in decay) is not tie
    assert {"embedding.weight", "positional.weight.weight", "final_norm.weight"} <= no_decay
    assert all(
        name.endswith(("norm.weight", "bias"))
        for name in no_decay - {"embedding.weight", "positional.weight.weight"}
    )
    # Every trainable tensor exactly once (a tied head is the embedding tensor, counted once).
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert opt.param_groups[0]["fused"] is not True  # fused only on CUDA


def test_tied_head_is_one_undecayed_tensor() -> None:
    model = tiny_lm(tie=True)
    classes = classify_parameters(model)
    assert classes.head == []
    assert [n for n, _ in classes.table].count("embedding.weight") == 1
    assert model.head_weight is classes.table[0][1]


def test_tied_linear_head_counts_once_as_table() -> None:
    # A head tied by sharing the tensor with a Linear (HF style) is still an embedding: no decay, no Muon.
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.hidden = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    classes = classify_parameters(Tied())
    assert [n for n, _ in classes.table] == ["embed.weight"]
    assert [n for n, _ in classes.matrix] == ["hidden.weight"]
    assert classes.head == [] and [n for n, _ in classes.other] == ["hidden.bias"]


def test_frozen_parameters_are_excluded() -> None:
    model = tiny_lm()
    model.embedding.requires_grad_(False)
    model.blocks[0].mixin.qkv_proj.requires_grad_(False)
    for name in ("adamw", "muon", "ademamix"):
        opt = build_optimizer(model, TrainerConfig(optimizer=name), "cpu", total_steps=10)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert id(model.embedding.weight) not in in_opt
        assert id(model.blocks[0].mixin.qkv_proj.weight) not in in_opt
        assert len(in_opt) == sum(p.requires_grad for p in model.parameters())


def test_unknown_optimizer_is_a_clear_error() -> None:
    with pytest.raises(ArchiFactoryError, match="trainer.optimizer='adam'"):
        build_optimizer(tiny_lm(), TrainerConfig(optimizer="adam"), "cpu")


def test_ademamix_needs_a_warmup_horizon() -> None:
    with pytest.raises(ArchiFactoryError, match="ademamix_warmup_steps"):
        build_optimizer(tiny_lm(), TrainerConfig(optimizer="ademamix"), "cpu")


def lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # A learnable pattern: next token = (token + 1) mod VOCAB.
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    return x, (x + 1) % VOCAB


def train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    x, y = lm_batch()
    losses = []
    for _ in range(steps):
        loss = model(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["adamw", "muon", "ademamix"])
def test_each_optimizer_reduces_lm_loss(name: str) -> None:
    model = tiny_lm()
    cfg = TrainerConfig(optimizer=name, lr=1e-2, warmup_steps=2, schedule="constant", weight_decay=0.0)
    opt = build_optimizer(model, cfg, "cpu", total_steps=30)
    losses = train(model, opt, build_scheduler(opt, cfg, 30), 30)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["adamw", "muon", "ademamix"])
def test_state_dict_round_trip_gives_identical_next_steps(name: str) -> None:
    cfg = TrainerConfig(optimizer=name, lr=1e-2, warmup_steps=3, schedule="cosine", weight_decay=0.1)
    model = tiny_lm()
    opt = build_optimizer(model, cfg, "cpu", total_steps=12)
    sched = build_scheduler(opt, cfg, 12)
    train(model, opt, sched, 4)
    # Through bytes, as a checkpoint would be (state_dict() returns live tensors, not copies).
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict(), sched.state_dict()), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reference = train(model, opt, sched, 4)
    reference_params = [p.detach().clone() for p in model.parameters()]

    model2 = tiny_lm()
    model2.load_state_dict(saved[0])
    opt2 = build_optimizer(model2, cfg, "cpu", total_steps=12)
    sched2 = build_scheduler(opt2, cfg, 12)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    resumed = train(model2, opt2, sched2, 4)
    assert resumed == reference
    for a, b in zip(reference_params, model2.parameters()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_optimizer_state_from_another_architecture_is_refused() -> None:
    cfg = TrainerConfig(optimizer="adamw")
    small = tiny_lm(bias=False)
    opt = build_optimizer(small, cfg, "cpu")
    other = build_optimizer(tiny_lm(bias=True), cfg, "cpu")
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


def expected_newton_schulz(singular_values: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton–Schulz iteration acts on each singular value s (after dividing by the Frobenius
    norm) as the scalar polynomial s ← a s + b s³ + c s⁵, applied `steps` times."""
    a, b, c = 3.4445, -4.7750, 2.0315
    s = singular_values / singular_values.norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def muon_first_step_by_hand(
    weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, lr: float, wd: float, mu: float
):
    # Step 1 with torch's EMA momentum: B = (1-μ) g; Nesterov update (1-μ) g + μ B = (1-μ)(1+μ) g, a
    # positive multiple of g, which the Frobenius normalisation removes: the update is NS(g) = U f(S) Vᵀ.
    del mu
    update = u @ torch.diag(expected_newton_schulz(s)) @ vh
    rows, cols = weight.shape
    return weight * (1 - lr * wd) - lr * math.sqrt(max(1.0, rows / cols)) * update


@pytest.mark.parametrize(
    "muon_cls", [getattr(torch.optim, "Muon", None), NewtonSchulzMuon], ids=["torch", "ours"]
)
@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_muon_first_step_matches_hand_computation(muon_cls, shape: tuple[int, int]) -> None:
    if muon_cls is None:
        pytest.skip("this torch has no torch.optim.Muon")
    torch.manual_seed(0)
    # A gradient with known, well-spread singular values: g = U diag(s) Vᵀ.
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])[:k]
    grad = u @ torch.diag(s) @ v.T
    weight = nn.Parameter(torch.randn(shape))
    weight_before = weight.detach().clone()
    expected = muon_first_step_by_hand(weight.detach(), u, s, v.T, lr=0.02, wd=0.1, mu=0.95)

    opt = muon_cls([weight], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    weight.grad = grad.clone()
    opt.step()
    # torch runs Newton–Schulz in bf16: its update (entries ~0.02) is exact to ~2% of its size; ours runs
    # in fp32 on CPU.
    atol = 1e-5 if muon_cls is NewtonSchulzMuon else 5e-4
    torch.testing.assert_close(weight.detach(), expected, atol=atol, rtol=0)
    assert (weight.detach() - weight_before).abs().max() > 0.01  # the step is not vacuous (lr = 0.02)


def test_our_muon_matches_torch_muon_over_several_steps() -> None:
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(8, 5))
    b = nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    ours = NewtonSchulzMuon([a], lr=0.05, weight_decay=0.1, momentum=0.9)
    theirs = torch.optim.Muon([b], lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True)
    for i in range(5):
        g = torch.randn(8, 5, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # torch orthogonalises in bf16, ours in fp32 on CPU: the trajectories agree to bf16 precision.
    assert ((a - b).norm() / (b - start).norm()).item() < 0.02


def test_muon_routes_matrices_and_scales_both_lrs() -> None:
    model = tiny_lm()
    cfg = TrainerConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1, warmup_steps=4)
    opt = build_optimizer(model, cfg, "cpu")
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.endswith("proj.weight")}
    (head_wd, head), (rest_wd, rest) = group_names(model, adamw)
    assert head == {"lm_head.weight"} and head_wd == 0.1 and rest_wd == 0.0
    assert "embedding.weight" in rest
    sched = build_scheduler(opt, cfg, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 / 4, 3e-3 / 4, 3e-3 / 4])
    train(model, opt, sched, 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 3e-3, 3e-3])
    assert len(opt.state) == len(list(model.parameters()))  # the merged state view sees both halves


def test_ademamix_first_step_matches_hand_computation() -> None:
    lr, b1, b2, b3, alpha, eps, wd, warmup = 0.1, 0.9, 0.95, 0.999, 5.0, 1e-8, 0.1, 10
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    g = torch.tensor([[0.2, -0.4], [0.0, 1.5]])
    weight = nn.Parameter(w0.clone())
    opt = AdEMAMix(
        [weight], lr=lr, betas=(b1, b2, b3), alpha=alpha, warmup_steps=warmup, eps=eps, weight_decay=wd
    )
    weight.grad = g.clone()
    opt.step()

    # t = 1: alpha(1) = alpha / T; beta3(1) interpolates the half-life 1/T of the way from beta1's to beta3's.
    alpha1 = alpha * 1 / warmup
    half_life = lambda beta: math.log(0.5) / math.log(beta) - 1
    beta3_1 = 0.5 ** (1 / ((1 - 1 / warmup) * half_life(b1) + (1 / warmup) * half_life(b3) + 1))
    assert b1 < beta3_1 < b3
    m1_hat = (1 - b1) * g / (1 - b1)  # bias-corrected fast EMA = g
    m2 = (1 - beta3_1) * g  # slow EMA, not bias-corrected
    nu_hat = (1 - b2) * g**2 / (1 - b2)  # = g²
    expected = w0 - lr * ((m1_hat + alpha1 * m2) / (nu_hat.sqrt() + eps) + wd * w0)
    torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=1e-6)
    assert AdEMAMix.beta3_at(warmup, b1, b3, warmup) == b3
    assert AdEMAMix.alpha_at(warmup // 2, alpha, warmup) == pytest.approx(alpha / 2)
    # At the end of the warmup the interpolated half-life is beta3's own.
    assert AdEMAMix.beta3_at(warmup - 1e-9, b1, b3, warmup) == pytest.approx(b3, abs=1e-6)


def test_ademamix_reduces_loss_on_regression() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Linear(8, 1)
    # beta3=0.99 so the slow EMA's memory (~100 steps) fits the run; the LM test uses the default 0.9999.
    opt = AdEMAMix(model.parameters(), lr=0.05, betas=(0.9, 0.999, 0.99), alpha=5.0, warmup_steps=50)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(100):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05 * first


def test_muon_refuses_fsdp_sharded_matrices() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        mesh = init_device_mesh("cpu", (1,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ArchiFactoryError, match="optimizer=muon .* FSDP-sharded"):
            build_optimizer(model, TrainerConfig(optimizer="muon"), "cpu")
    finally:
        dist.destroy_process_group()

"""The residual options (`residual=…`, `archifactory/model/residual/`), parametrized over every registered one,
so a new option gets these tests by registration: config and docstring, decode == full forward (three mixin
families), causality, batch independence, document masking, accounting, labels, compile-clean (the Hugging
Face round trip with generation is in tests/test_hf.py); plus the options' own promises (hyper n=1 static ==
standard bit for bit, mHC's doubly stochastic H_res at every step, every connection weight trained) and an
exact resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from archifactory.config.compose import group_options
from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.documents import DocumentLayout
from archifactory.model.residual.base import Residual
from archifactory.model.residual.mhc import ManifoldHyperConnection
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.train import loop
from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.train.test_loop import read_metrics, smoke_config, write_corpus

RESIDUALS = sorted(components("residual"))
V = 64
SHAPE = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=3", f"model.vocab_size={V}"]
# small stream counts keep the tests fast; n=3 with 6 sub-layers still reads every stream at init
OPTIONS = {"hyper": ["residual.expansion=3"], "mhc": ["residual.expansion=3"]}


def config(residual: str, *extra: str):
    return compose_config([*SHAPE, f"residual={residual}", *OPTIONS.get(residual, []), *extra])


def residual_parameters(model: StackedMixinForCausalLM) -> dict[str, torch.nn.Parameter]:
    return {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and name.split(".")[2] in ("mixin_residual", "ffn_residual")
    }


def perturbed(model: StackedMixinForCausalLM, scale: float = 0.2) -> StackedMixinForCausalLM:
    """Move every residual weight off its init (dynamic projections are zero there), so equivalences
    cannot pass on a connection that is still the identity."""
    with torch.no_grad():
        for p in residual_parameters(model).values():
            p.add_(scale * torch.randn_like(p))
    return model


def model_for(residual: str, *extra: str, seed: int = 0) -> StackedMixinForCausalLM:
    torch.manual_seed(seed)
    return perturbed(build_model(config(residual, *extra), V)).double().eval()


def test_every_residual_option_has_a_config_and_a_docstring() -> None:
    assert set(RESIDUALS) == set(group_options("residual")), (
        "every residual option needs configs/residual/<name>.yaml"
    )
    for name, cls in components("residual").items():
        assert issubclass(cls, Residual)
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40, f"residual={name} needs a docstring"


def test_standard_is_the_default() -> None:
    assert compose_config([]).residual.name == "standard"


EQUIVALENT = [name for name in RESIDUALS if components("residual")[name].standard_equivalent is not None]


def test_hyper_declares_its_standard_equivalent() -> None:
    assert components("residual")["hyper"].standard_equivalent == {"expansion": 1, "dynamic": False}
    assert "mhc" not in EQUIVALENT  # doubly stochastic mixing of copies: the standard residual up to scale


@pytest.mark.parametrize("mixin", ["gqa", "gated_deltanet"])
@pytest.mark.parametrize("residual", EQUIVALENT)
def test_the_standard_equivalent_setting_is_the_standard_residual_bit_for_bit(
    residual: str, mixin: str
) -> None:
    """Every option that declares `standard_equivalent` (hyper: one static stream) is checked: same logits
    and loss bit for bit, gradients to rounding."""
    ids = torch.randint(0, V, (2, 11))
    torch.manual_seed(0)
    standard = build_model(config("standard", f"mixin={mixin}"), V)
    options = components("residual")[residual].standard_equivalent
    torch.manual_seed(0)
    hyper = build_model(
        compose_config(
            [
                *SHAPE,
                f"residual={residual}",
                f"mixin={mixin}",
                *(f"residual.{k}={v}" for k, v in options.items()),
            ]
        ),
        V,
    )
    if residual == "hyper":
        assert residual_parameters(hyper), "the static hyper-connection has weights (B, A_m, A_r)"
    a, b = standard(ids, targets=ids), hyper(ids, targets=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    # the gradients agree to rounding only: autograd reaches the weights through differently strided
    # tensors (the stream dimension), so BLAS may sum in another order
    hyper_parameters = dict(hyper.named_parameters())
    for name, p in standard.named_parameters():
        torch.testing.assert_close(hyper_parameters[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def train_steps(model: StackedMixinForCausalLM, steps: int, lr: float = 3e-2) -> None:
    """A few Adam steps (no weight decay, which would move every weight on its own) on random tokens."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, V, (4, 16), generator=generator)
        model(ids, targets=ids.roll(-1, 1)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_mhc_mixing_is_doubly_stochastic_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = ManifoldHyperConnection.mappings

    def recording(self, h):
        h_pre, h_post, h_res = original(self, h)
        seen.append(h_res.detach())
        return h_pre, h_post, h_res

    monkeypatch.setattr(ManifoldHyperConnection, "mappings", recording)
    torch.manual_seed(0)
    model = build_model(config("mhc"), V)
    train_steps(model, steps=3)
    assert len(seen) == 3 * 2 * 3  # steps × sub-layers per block × blocks
    for h_res in seen:
        assert (h_res >= 0).all()
        ones = torch.ones(h_res.shape[:-1], dtype=h_res.dtype)
        torch.testing.assert_close(h_res.sum(-1), ones, rtol=0, atol=1e-6)
        torch.testing.assert_close(h_res.sum(-2), ones, rtol=0, atol=1e-6)
    first, last = torch.stack(seen[:6]), torch.stack(seen[-6:])  # every sub-layer's, steps 1 and 3
    assert (last - first).abs().max() > 1e-3, "training moved H_res"
    assert (last - last[:, :1, :1]).abs().max() > 1e-4, "H_res depends on the token (dynamic mappings)"
    composite = seen[-6]  # the last step's composite residual map across depth: still doubly stochastic
    for h_res in seen[-5:]:
        composite = h_res @ composite
    torch.testing.assert_close(composite.sum(-1), torch.ones(composite.shape[:-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(composite.sum(-2), torch.ones(composite.shape[:-1]), rtol=0, atol=1e-5)


def gradient_pieces(model: StackedMixinForCausalLM) -> dict[str, torch.Tensor]:
    """Each connection weight's gradient; mHC's φ split into its H_pre, H_post and H_res columns."""
    pieces = {}
    for name, p in residual_parameters(model).items():
        if name.endswith(".phi"):
            n = round((p.shape[1] + 1) ** 0.5) - 1  # n² + 2n = (n + 1)² − 1 columns
            for part, grad in zip(("pre", "post", "res"), p.grad.split([n, n, n * n], dim=1)):
                pieces[f"{name}[{part}]"] = grad
        else:
            pieces[name] = p.grad
    return pieces


def mhc_inert(name: str, num_layers: int) -> bool:
    """mHC's H_res of the first sub-layer (its streams are still copies of the embedding, and a doubly
    stochastic matrix maps equal streams to themselves) and of the last (the streams are summed after it,
    and its columns sum to 1) cannot change the output: no gradient reaches them, by construction."""
    ends = ("blocks.0.mixin_residual.", f"blocks.{num_layers - 1}.ffn_residual.")
    return name.startswith(ends) and (name.endswith(".b_res") or name.endswith(".phi[res]"))


def test_mhc_under_bf16_autocast_keeps_its_mappings_and_streams_in_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[torch.Tensor] = []
    original = ManifoldHyperConnection.write

    def recording(self, carry, out):
        seen.append(carry[0])  # H_res x, the residual path
        return original(self, carry, out)

    monkeypatch.setattr(ManifoldHyperConnection, "write", recording)
    model = build_model(config("mhc"), V)
    ids = torch.randint(0, V, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_pre, h_post, h_res = model.blocks[1].mixin_residual.mappings(torch.randn(2, 8, 3, 32))
        model(ids)
    assert {h_pre.dtype, h_post.dtype, h_res.dtype} == {torch.float32}
    torch.testing.assert_close(h_res.sum(-1), torch.ones(2, 8, 3), rtol=0, atol=1e-6)
    assert seen and {t.dtype for t in seen} == {torch.float32}


@pytest.mark.parametrize(
    "residual,extra",
    [("hyper", ["residual.dynamic=true"]), ("hyper", ["residual.dynamic=false"]), ("mhc", [])],
)
def test_gradients_reach_every_connection_weight(residual: str, extra: list[str]) -> None:
    """Three Adam steps: zero-initialised dynamic projections get a gradient once the first step has moved
    their scales' partners, so every weight must have had a clear gradient and moved off its init."""
    torch.manual_seed(0)
    model = build_model(config(residual, *extra), V)
    before = {name: p.detach().clone() for name, p in residual_parameters(model).items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(1)
    peak: dict[str, float] = {}
    for _ in range(3):
        ids = torch.randint(0, V, (4, 16), generator=generator)
        model(ids, targets=ids.roll(-1, 1)).loss.backward()
        for name, grad in gradient_pieces(model).items():
            peak[name] = max(peak.get(name, 0.0), grad.abs().max().item())
        optimizer.step()
        optimizer.zero_grad()
    layers = len(model.blocks)
    inert = {name for name in peak if residual == "mhc" and mhc_inert(name, layers)}
    assert len(inert) == (4 if residual == "mhc" else 0)
    starved = [name for name in peak if name not in inert and peak[name] < 1e-8]
    assert not starved, f"no gradient reached {starved}"
    assert all(peak[name] < 1e-9 for name in inert), {name: peak[name] for name in inert}
    after = residual_parameters(model)
    assert not [name for name, p in before.items() if torch.equal(p, after[name])]


@pytest.mark.parametrize("mixin", ["gqa", "gated_deltanet", "rwkv6"])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_decode_equals_full_forward(residual: str, mixin: str) -> None:
    model = model_for(residual, f"mixin={mixin}")
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(2)
        out = model(ids[:, :4], state=state)
        pieces = [out.logits]
        for t in range(4, 9):
            out = model(ids[:, t : t + 1], state=out.state)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)
    assert model.decode_state_size(9) == model_for("standard", f"mixin={mixin}").decode_state_size(9)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_causal_and_batch_independent(residual: str) -> None:
    model = model_for(residual)
    ids = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        base = model(ids).logits
        changed = ids.clone()
        changed[0, 6:] = (changed[0, 6:] + 1) % V  # the future of row 0
        changed[1] = (changed[1] + 1) % V  # all of row 1
        other = model(changed).logits
    torch.testing.assert_close(other[0, :6], base[0, :6], rtol=0, atol=1e-12)
    torch.testing.assert_close(other[2], base[2], rtol=0, atol=1e-12)
    assert not torch.allclose(other[0, 6:], base[0, 6:])


@pytest.mark.parametrize("residual", RESIDUALS)
def test_document_masking_equals_each_document_alone(residual: str) -> None:
    model = model_for(residual, "positional=learned")
    eos = 0
    first, second = torch.tensor([5, 6, 7, eos]), torch.tensor([8, 9, 10, 11, 12])
    ids = torch.cat([first, second]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, documents=DocumentLayout.from_ids(ids, eos)).logits
        alone = torch.cat([model(first[None]).logits, model(second[None]).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_accounting_counts_the_connections(residual: str) -> None:
    model = build_model(config(residual), V)
    breakdown = model.parameter_breakdown()
    expected = sum(p.numel() for p in residual_parameters(model).values())
    assert breakdown["residual"] == expected
    assert breakdown["total"] == sum(p.numel() for p in model.parameters())
    parts = breakdown["mixin"] + breakdown["ffn"] + breakdown["norms"]
    assert breakdown["non_embedding"] == parts + expected
    standard = build_model(config("standard"), V)
    assert (model.flops_per_token(16) > standard.flops_per_token(16)) == (residual != "standard")


@pytest.mark.parametrize("residual", RESIDUALS)
def test_variant_label_and_run_name_show_a_non_standard_residual(residual: str) -> None:
    cfg = config(residual, "mixin=gated_deltanet")
    if residual == "standard":
        assert cfg_variant_label(cfg) == "gated_deltanet"
        assert cfg.run_name.startswith("gated_deltanet_swiglu")
    else:
        assert cfg_variant_label(cfg) == f"gated_deltanet[residual={residual}]"
        assert cfg.run_name.startswith(f"gated_deltanet-{residual}_swiglu")


@pytest.mark.parametrize("residual", RESIDUALS)
def test_compile_clean(residual: str) -> None:
    """No graph break in a training forward nor in a decode step (docs/architecture.md, compile-clean)."""
    model = build_model(config(residual, "model.max_seq_len=64"), V)
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


def test_a_config_without_a_residual_section_builds_the_standard_residual() -> None:
    """Run configs and config.json files written before the group existed."""
    cfg = compose_config(SHAPE)
    sections = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "mixin", "ffn", "positional")
    }
    model = StackedMixinForCausalLM.from_sections(sections)
    assert {type(b.mixin_residual).registry_name for b in model.blocks} == {"standard"}
    assert model.parameter_breakdown()["residual"] == 0


RESUMED = [
    ([f"residual={name}", *OPTIONS.get(name, [])], "gqa" if name == "standard" else f"gqa[residual={name}]")
    for name in RESIDUALS
]
RESUMED.append(
    (
        ["residual=mhc", "residual.expansion=2", "model.value_residual=true"],
        "gqa[residual=mhc,value_residual]",
    )
)


@pytest.mark.parametrize("options,label", RESUMED, ids=[" ".join(o) for o, _ in RESUMED])
def test_a_run_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: list[str], label: str
) -> None:
    """A crash after step 6 (checkpoint at 4), then `trainer.resume=true`: the weights at step 8 (the
    connection weights included) and the loss curve equal an uninterrupted run's; every residual option,
    and value residual on top of mHC."""
    corpus, cache = write_corpus(tmp_path / "corpus", documents=100), tmp_path / "cache"
    overrides = [*options, "trainer.max_steps=8", "trainer.checkpoint_every=4"]
    overrides += ["trainer.eval_every=4", "trainer.log_every=2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(smoke_config(corpus, cache, *overrides), full)

    real_zero_grad = loop.torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def crash_after_6(self, set_to_none: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        real_zero_grad(self, set_to_none=set_to_none)

    monkeypatch.setattr(loop.torch.optim.Optimizer, "zero_grad", crash_after_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke_config(corpus, cache, *overrides), crashed)
    monkeypatch.undo()
    train(smoke_config(corpus, cache, *overrides, "trainer.resume=true"), crashed)

    final = "checkpoints/step_0000008/model.safetensors"
    a, b = load_file(str(full / final)), load_file(str(crashed / final))
    assert options[0] == "residual=standard" or any("residual" in name for name in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    curve_a, curve_b = (
        [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(run)]
        for run in (full, crashed)
    )
    assert [c[0] for c in curve_a] == [c[0] for c in curve_b]
    for (_, ta, va), (_, tb, vb) in zip(curve_a, curve_b):
        assert abs((ta or 0) - (tb or 0)) < 1e-5 and abs((va or 0) - (vb or 0)) < 1e-5
    summary = json.loads((full / "summary.json").read_text())
    assert summary["mixin"] == label

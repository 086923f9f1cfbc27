"""model.weights=hyper (`archifactory/model/hyper_weights.py`): at init every layer computes with layer 0's
weights; the hypernetwork (embeddings, GRU, heads) moves the generated weights and the output and gets
gradients; decode == full forward; padding and document masking; activation checkpointing; the count is
what matching and `list --params` report; FLOPs; a hybrid is refused in one line; labels; compile-clean;
the plan; the Hugging Face round trip and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.generate.sampling import generate
from archifactory.model.build import build_model
from archifactory.model.documents import DocumentLayout
from archifactory.model.match import apply_match
from archifactory.model.params_list import params_rows
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.train import loop
from archifactory.train.loop import train
from archifactory.train.plan import build_plan
from tests.helpers import compose_config
from tests.model.test_compile import explain, reasons
from tests.test_hf import saved_model, tokenizer  # noqa: F401  (tokenizer: a fixture)
from tests.train.test_loop import smoke_config, write_corpus

V = 64
SHAPE = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=3", f"model.vocab_size={V}"]
HYPER = ["model.weights=hyper", "model.hyper.embed_dim=8", "model.hyper.hidden=16"]


def hyper_model(*extra: str, seed: int = 0) -> StackedMixinForCausalLM:
    torch.manual_seed(seed)
    return build_model(compose_config([*SHAPE, *HYPER, *extra]), V)


def move_heads(model: StackedMixinForCausalLM, std: float = 0.3) -> None:
    """Off the zero init, so the generated weights differ per layer (and tests cannot pass vacuously)."""
    with torch.no_grad():
        model.hyper.heads.weight.normal_(0.0, std)


def test_at_init_every_layer_computes_with_the_base() -> None:
    """P_W = 0: W_l = W_base exactly, and the model equals a standard one whose every layer holds layer 0's
    mixin and FFN (its own norms and everything else copied), bit for bit."""
    model = hyper_model("mixin=gated_deltanet")
    base = dict(model.blocks[0].named_parameters())
    for layer in model.hyper.layer_weights(model.blocks[0]):
        assert {name for name in base if name.startswith(("mixin.", "ffn."))} >= set(layer)
        for name, tensor in layer.items():
            assert torch.equal(tensor, base[name]), name
    standard = build_model(compose_config([*SHAPE, "mixin=gated_deltanet"]), V)
    ours = model.state_dict()
    copied = {}
    for key in standard.state_dict():
        parts = key.split(".")
        shared = parts[0] == "blocks" and parts[2] in ("mixin", "ffn") and key not in ours
        copied[key] = ours[".".join(["blocks", "0", *parts[2:]]) if shared else key]
    standard.load_state_dict(copied)
    ids = torch.randint(0, V, (2, 16))
    assert torch.equal(model(ids).logits, standard(ids).logits)


def test_the_hypernetwork_moves_the_weights_and_the_output() -> None:
    """Each part of the hypernetwork (heads, GRU, embeddings) changes the generated weights of every layer,
    differently per layer, and the logits."""
    model = hyper_model()
    ids = torch.randint(0, V, (2, 16))
    move_heads(model)
    with torch.no_grad():
        before = model.hyper.layer_weights(model.blocks[0])
        logits = model(ids).logits
        name = "mixin.qkv_proj.weight"
        assert not torch.equal(before[0][name], before[1][name])
        assert not torch.equal(before[0][name], model.blocks[0].mixin.qkv_proj.weight)
        for part in (model.hyper.depth.cell.weight_ih, model.hyper.depth.embeddings):
            part.add_(0.5 * torch.randn_like(part))
            after = model.hyper.layer_weights(model.blocks[0])
            for old, new in zip(before, after):
                assert not torch.equal(old[name], new[name])
            assert not torch.allclose(model(ids).logits, logits)
            before, logits = after, model(ids).logits


def test_gradients_reach_the_base_and_every_part_of_the_hypernetwork() -> None:
    model = hyper_model()
    ids = torch.randint(0, V, (2, 16))
    model(ids, targets=ids).loss.backward()  # at init only the heads (P_W = 0) and the base move
    assert model.hyper.heads.weight.grad.abs().sum() > 0
    model.zero_grad()
    move_heads(model)
    model(ids, targets=ids).loss.backward()
    depth = model.hyper.depth
    for name, param in [
        ("heads", model.hyper.heads.weight),
        ("embeddings", depth.embeddings),
        ("gru", depth.cell.weight_ih),
        ("gru hidden", depth.cell.weight_hh),
        ("base q", model.blocks[0].mixin.qkv_proj.weight),
        ("base ffn", model.blocks[0].ffn.out_proj.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "mixin,extra",
    [("gqa", []), ("gated_deltanet", []), ("rwkv6", []), ("gqa", ["model.value_residual=true"])],
)
def test_decode_equals_full_forward(mixin: str, extra: list[str]) -> None:
    """Every decode call regenerates the same weights; value residual keeps its per-layer gates."""
    model = hyper_model(f"mixin={mixin}", *extra).eval()
    move_heads(model)
    if extra:  # the gates stay per layer: not shared, not stripped
        assert all("mixin.value_residual.lam" in dict(b.named_parameters()) for b in model.blocks[1:])
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], state=model.init_state(2))
        steps, state = [out.logits], out.state
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], state=state)
            steps.append(out.logits)
            state = out.state
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_left_padded_row_equals_the_row_alone() -> None:
    """Padding is the mixins' own (only weights change): a left-padded row's logits are the row's."""
    model = hyper_model("mixin=gated_deltanet").eval()
    move_heads(model)
    row = torch.randint(1, V, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, masked = model(row).logits, model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)


def test_document_masking_equals_each_document_alone() -> None:
    model = hyper_model("mixin=gated_deltanet").eval()
    move_heads(model)
    eos = 0
    first, second = torch.tensor([5, 6, 7, eos]), torch.tensor([8, 9, 10, 11, 12])
    ids = torch.cat([first, second]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, documents=DocumentLayout.from_ids(ids, eos)).logits
        alone = torch.cat([model(first[None]).logits, model(second[None]).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """The swap lies inside the checkpointed function, so the recompute uses the generated weights too."""
    ids = torch.randint(0, V, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = hyper_model().train()
        move_heads(model)
        for block in model.blocks:
            block.activation_checkpointing = checkpointing
        model(ids, targets=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_parameters_are_counted_once_and_match_list_and_matching() -> None:
    """The shared base is counted once, the hypernetwork under `hyper` (in non_embedding); matching, the
    built model and `list --params` agree."""
    model = hyper_model()
    breakdown = model.parameter_breakdown()
    assert breakdown["hyper"] == sum(p.numel() for p in model.hyper.parameters()) > 0
    assert breakdown["mixin"] == sum(p.numel() for p in model.blocks[0].mixin.parameters())
    assert breakdown["total"] == sum(p.numel() for p in model.parameters())
    assert breakdown["non_embedding"] == breakdown["total"] - breakdown["embedding"] - breakdown["head"]
    overrides = ["dataset=text", "dataset.path=unused", "model.target_params=2M", *HYPER]
    cfg, result = apply_match(compose_config(["mixin=gqa", *overrides]))
    with torch.device("meta"):
        built = build_model(cfg, cfg.dataset.vocab_size).parameter_breakdown()
    assert built["non_embedding"] == result.achieved and abs(result.error) <= 0.01
    (row,) = params_rows(["mixin=gqa", "ffn=swiglu", *overrides])
    assert (row["non_embedding"], row["params"]) == (result.achieved, built["total"])


def test_flops_count_the_generation_once_per_forward() -> None:
    hyper = hyper_model()
    standard = build_model(compose_config(SHAPE), V)
    for seq_len in (16, 64):
        extra = hyper.flops_per_token(seq_len) - standard.flops_per_token(seq_len)
        assert extra == pytest.approx(hyper.hyper.flops() / seq_len)
    assert hyper.hyper.flops() > 0


def test_a_hybrid_is_refused_in_one_line() -> None:
    cfg = compose_config([*SHAPE, *HYPER, "mixin=gated_deltanet", "model.attention_every=2"])
    with pytest.raises(ArchiFactoryError) as error:
        build_model(cfg, V)
    assert "\n" not in str(error.value) and "model.weights=hyper" in str(error.value)


def test_labels_show_the_option() -> None:
    cfg = compose_config([*SHAPE, *HYPER, "residual=mhc"])
    assert cfg_variant_label(cfg) == "gqa[residual=mhc,weights=hyper]"
    assert cfg.run_name.startswith("gqa-mhc-hyperw_")


def test_no_graph_breaks() -> None:
    result = explain(["mixin=gqa", "positional=rope", *HYPER])
    assert result.graph_break_count == 0, "\n".join(reasons(result))


def test_hugging_face_round_trip(tokenizer, tmp_path: Path) -> None:  # noqa: F811
    model, folder = saved_model(tokenizer, tmp_path / "model", "gqa", "swiglu", *HYPER)
    assert json.loads((folder / "config.json").read_text())["model"]["weights"] == "hyper"
    ids = torch.tensor([tokenizer.encode("the queen said to the king")])
    with torch.no_grad():
        reference = model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(folder)
        loaded = StackedMixinForCausalLM.from_pretrained(folder)
        assert torch.equal(loaded(ids).logits, reference) and torch.equal(hf(ids).logits, reference)
    expected = generate(model, ids, max_new_tokens=6)[0].tokens
    produced = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert produced[0, ids.shape[1] :].tolist() == expected


def test_a_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after step 3 (checkpoint at 2), then `trainer.resume=true`: the weights at step 4 (the
    hypernetwork's included) equal an uninterrupted run's."""
    corpus, cache = write_corpus(tmp_path / "corpus", documents=100), tmp_path / "cache"
    overrides = [*HYPER, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(smoke_config(corpus, cache, *overrides), full)
    real_zero_grad = loop.torch.optim.Optimizer.zero_grad
    calls = {"n": 0}

    def crash_after_3(self, set_to_none: bool = True) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        real_zero_grad(self, set_to_none=set_to_none)

    monkeypatch.setattr(loop.torch.optim.Optimizer, "zero_grad", crash_after_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(smoke_config(corpus, cache, *overrides), crashed)
    monkeypatch.undo()
    train(smoke_config(corpus, cache, *overrides, "trainer.resume=true"), crashed)
    final = "checkpoints/step_0000004/model.safetensors"
    a, b = load_file(str(full / final)), load_file(str(crashed / final))
    assert any(name.startswith("hyper.") for name in a) and a.keys() == b.keys()
    for name in a:
        assert torch.equal(b[name], a[name]), name
    assert json.loads((full / "summary.json").read_text())["mixin"] == "gqa[weights=hyper]"


def test_the_plan_traces_the_activations() -> None:
    """`archifactory plan` traces a hyper model's forward (each block counted once, though it runs through
    its own `__call__` twice; the generated weights the matmuls save count as activations)."""
    base = ["dataset=text", "dataset.path=unused", *SHAPE]
    standard = build_plan(compose_config(base), 1).memory
    hyper = build_plan(compose_config([*base, *HYPER]), 1).memory
    assert standard.activations is not None and hyper.activations is not None
    assert hyper.activations > standard.activations

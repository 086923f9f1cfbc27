"""`model.pretrained_from`: embedding, final norm and LM head from a locally saved tiny transformers Llama.

The source is built here, offline: a byte-level BPE trained with `tokenizers` on the test corpus, wrapped
as a `PreTrainedTokenizerFast` and saved with a random-weight `LlamaForCausalLM` (its final norm
randomised too, so a fresh norm of ones cannot pass for it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.train.test_loop import write_corpus

HIDDEN = 64


def save_tiny_llama(folder: Path, corpus: Path, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    """A tiny Llama + tokenizer saved with save_pretrained; returns its embedding / norm / head tensors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([p.read_text() for p in sorted(corpus.glob("*.txt"))], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 4,  # padded rows, as real checkpoints have
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "embedding.weight": model.get_input_embeddings().weight.detach().clone(),
        "final_norm.weight": model.model.norm.weight.detach().clone(),
        "lm_head.weight": model.get_output_embeddings().weight.detach().clone(),
    }


def recipe(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "dataset=text",
        f"dataset.path={corpus}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "model=tiny",
        f"model.hidden_size={HIDDEN}",
        "model.num_layers=1",
        "trainer=smoke",
        "trainer.max_steps=20",
        "trainer.seq_len=32",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=20",
        "trainer.checkpoint_every=10",
        "trainer.lr=1e-2",
        *extra,
    ]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("pretrained")
    corpus = write_corpus(root / "corpus", documents=100)
    return root / "llama", corpus, save_tiny_llama(root / "llama", corpus)


def test_frozen_parts_equal_the_source_through_training(source, tmp_path: Path) -> None:
    folder, corpus, tensors = source
    run_dir = tmp_path / "run"
    cfg = compose_config(
        recipe(tmp_path, corpus, f"model.pretrained_from={folder}", "model.freeze_pretrained=true")
    )
    summary = train(cfg, run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 20
    middle = load_file(str(run_dir / "checkpoints/step_0000010/model.safetensors"))
    weights = load_file(str(run_dir / "checkpoints/step_0000020/model.safetensors"))
    for name, tensor in tensors.items():
        torch.testing.assert_close(middle[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
    trained = [n for n in weights if n.startswith("blocks.") and not torch.equal(weights[n], middle[n])]
    assert trained  # the blocks did train meanwhile
    # the run tokenized with the source's tokenizer, and saved it as its own
    source_vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    run_vocab = json.loads((run_dir / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    assert run_vocab == source_vocab
    saved = (run_dir / ".hydra/config.yaml").read_text()
    assert f"tokenizer: {folder.resolve()}" in saved
    assert f"vocab_size: {tensors['embedding.weight'].shape[0]}" in saved
    # the run's plan.md counted the loaded parts as frozen
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in (run_dir / "plan.md").open()}
    frozen = sum(t.numel() for t in tensors.values())
    assert rows["parameters: trainable"] == f"{summary['params_total'] - frozen:,}"
    assert rows["pretrained parts"].endswith(f"from {folder.resolve()} (frozen)")


def test_unfrozen_parts_start_from_the_source_and_train(source, tmp_path: Path) -> None:
    folder, corpus, tensors = source
    from archifactory.hf.pretrained import apply_pretrained, load_pretrained_parts
    from archifactory.model.build import build_model

    cfg = apply_pretrained(compose_config(recipe(tmp_path, corpus, f"model.pretrained_from={folder}")))
    model = build_model(cfg, 0, **load_pretrained_parts(cfg))
    for name, tensor in tensors.items():
        param = model.get_parameter(name)
        torch.testing.assert_close(param.detach(), tensor, rtol=0, atol=0)
        assert param.requires_grad
    assert model.final_norm.eps == pytest.approx(1e-6)


def test_refusals_are_one_line(source, tmp_path: Path) -> None:
    folder, corpus, _ = source
    cases = {
        f"model.hidden_size={2 * HIDDEN}": "hidden size 64",
        "dataset.tokenizer=gpt2": "brings its own tokenizer",
        "model.norm=layernorm": "does not match model.norm=layernorm",
    }
    for override, message in cases.items():
        cfg = compose_config(recipe(tmp_path, corpus, f"model.pretrained_from={folder}", override))
        with pytest.raises(ArchiFactoryError, match=message):
            train(cfg, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    missing = compose_config(recipe(tmp_path, corpus, f"model.pretrained_from={tmp_path / 'nowhere'}"))
    with pytest.raises(ArchiFactoryError, match="no such folder"):
        train(missing, tmp_path / "refused")
    hub_id = compose_config(recipe(tmp_path, corpus, "model.pretrained_from=nobody/no-such-model"))
    with pytest.raises(ArchiFactoryError, match="Hugging Face Hub"):
        train(hub_id, tmp_path / "refused")


def test_the_plan_counts_the_pretrained_parts_and_what_trains(source, tmp_path: Path, capsys) -> None:
    """`archifactory plan model.pretrained_from=… model.freeze_pretrained=true`: the source's parts are
    built (shapes from its config), counted as frozen, and left out of the gradients and optimizer state."""
    from archifactory.cli.main import main
    from archifactory.hf.pretrained import apply_pretrained, load_pretrained_parts
    from archifactory.model.build import build_model
    from archifactory.train.optim import build_optimizer
    from archifactory.train.plan import build_plan

    folder, corpus, tensors = source
    frozen = sum(t.numel() for t in tensors.values())
    overrides = recipe(tmp_path, corpus, f"model.pretrained_from={folder}")
    cfg = apply_pretrained(compose_config([*overrides, "model.freeze_pretrained=true"]))
    trained = build_plan(apply_pretrained(compose_config(overrides)), world_size=1)
    plan = build_plan(cfg, world_size=1)
    model = build_model(cfg, 0, **load_pretrained_parts(cfg))
    assert plan.breakdown == trained.breakdown == model.parameter_breakdown()
    assert trained.trainable == plan.breakdown["total"] and plan.trainable == plan.breakdown["total"] - frozen
    assert plan.memory.parameters == trained.memory.parameters == 4 * plan.breakdown["total"]
    assert plan.memory.gradients == 4 * plan.trainable
    # the optimizer state is the real optimizer's after a step of the frozen model
    optimizer = build_optimizer(model, cfg.trainer, "cpu", total_steps=10)
    ids = torch.randint(0, model.vocab_size, (2, 32))
    model(ids, targets=ids, return_logits=False).loss.backward()
    optimizer.step()
    real = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert plan.memory.optimizer == real < trained.memory.optimizer
    # fsdp: the frozen root unit is gathered for the forward but has no gradients to hold
    fsdp = build_plan(apply_pretrained(compose_config([*overrides, "model.freeze_pretrained=true",
                                                       "trainer.strategy=fsdp"])), world_size=2)  # fmt: skip
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert fsdp.memory.gradients == 4 * plan.trainable // 2 + 4 * block
    assert fsdp.memory.parameters == 4 * plan.breakdown["total"] // 2 + 4 * (frozen + 2 * block)
    # bf16 autocast still casts the frozen head for the backward
    bf16 = [*overrides, "trainer.precision=bf16"]
    copies = build_plan(apply_pretrained(compose_config(bf16)), world_size=1).memory.weight_copies
    frozen_bf16 = apply_pretrained(compose_config([*bf16, "model.freeze_pretrained=true"]))
    assert build_plan(frozen_bf16, world_size=1).memory.weight_copies == copies > 0

    assert main(["plan", *overrides, "model.freeze_pretrained=true"]) == 0
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in capsys.readouterr().out.splitlines()
    }
    assert rows["parameters: trainable"] == f"{plan.trainable:,}"
    assert rows["pretrained parts"] == f"embedding, final norm, LM head from {folder.resolve()} (frozen)"
    assert f"vocab {tensors['embedding.weight'].shape[0]:,}" in rows["model"]

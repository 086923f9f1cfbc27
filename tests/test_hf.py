"""Hugging Face format: save -> load (ours, AutoModelForCausalLM) -> identical logits and generations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.data.tokenizer import Tokenizer, train_bpe
from archifactory.generate.sampling import generate
from archifactory.hf.model import ArchiFactoryForCausalLM
from archifactory.hf.write import config_from_run, save_pretrained
from archifactory.model.build import build_model
from archifactory.model.stack import StackedMixinForCausalLM
from tests.helpers import compose_config

MIXINS = sorted(components("mixin"))
TEXT = "the king sat on the mat. the queen said to her bird: sing! " * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_bpe([TEXT], 300, tmp_path_factory.mktemp("tok") / "bpe")


def saved_model(
    tokenizer: Tokenizer, folder: Path, mixin: str, ffn: str = "swiglu", *extra: str
) -> tuple[StackedMixinForCausalLM, Path]:
    """A 2-layer model with weights moved off their init, written as a `model/` folder."""
    cfg = compose_config(
        [
            f"mixin={mixin}",
            f"ffn={ffn}",
            "model.hidden_size=64",
            "model.num_heads=4",
            "model.num_layers=2",
            *extra,
        ]
    )
    model = build_model(cfg, tokenizer.vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.head_weight.mul_(20.0)
    return model, save_pretrained(model, config_from_run(cfg, tokenizer.vocab_size), tokenizer, folder)


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


PADDED_PROMPTS = ("the queen said to the king", "the mat", "sing! the bird sat on")


def left_padded_prompts(tokenizer) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(t) for t in PADDED_PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


@pytest.mark.parametrize("mixin", MIXINS)
def test_save_then_load_gives_identical_logits_and_generations_also_left_padded(
    mixin: str, tokenizer, tmp_path: Path
) -> None:
    model, folder = saved_model(tokenizer, tmp_path / "model", mixin)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    ids = torch.tensor([tokenizer.encode("the queen said to the king")])
    with torch.no_grad():
        reference = model(ids).logits
        ours = StackedMixinForCausalLM.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(hf, ArchiFactoryForCausalLM) and not hf.training
        torch.testing.assert_close(ours(ids).logits, reference, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=0)
    # transformers' own generate() with the model's state as its cache == ours, token for token
    expected = generate(model, ids, max_new_tokens=12)[0].tokens
    produced = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert produced[0, ids.shape[1] :].tolist() == expected
    # and over a left-padded batch each row generates as it does alone
    rows, ids, mask = left_padded_prompts(tokenizer)
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    produced = hf.generate(ids, attention_mask=mask, **options)[:, ids.shape[1] :]
    for b, row in enumerate(rows):
        alone = hf.generate(torch.tensor([row]), **options)[0, len(row) :]
        assert produced[b].tolist() == alone.tolist()


@pytest.mark.parametrize(
    "residual,extra",
    [(name, []) for name in sorted(components("residual"))] + [("mhc", ["model.value_residual=true"])],
)
def test_every_residual_option_round_trips(
    residual: str, extra: list[str], tokenizer, tmp_path: Path
) -> None:
    """config.json carries the `residual` section (and model.value_residual); loading rebuilds the same
    connections and generates the same."""
    model, folder = saved_model(
        tokenizer, tmp_path / "model", "gqa", "swiglu", f"residual={residual}", *extra
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["residual"]["name"] == residual
    assert config["model"].get("value_residual", False) == bool(extra)
    ids = torch.tensor([tokenizer.encode("the queen said to the king")])
    with torch.no_grad():
        reference = model(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(
            StackedMixinForCausalLM.from_pretrained(folder)(ids).logits, reference, rtol=0, atol=0
        )
        torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=0)
    expected = generate(model, ids, max_new_tokens=8)[0].tokens
    produced = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert produced[0, ids.shape[1] :].tolist() == expected


def test_stateful_ffn_round_trips(tokenizer, tmp_path: Path) -> None:
    model, folder = saved_model(tokenizer, tmp_path / "model", "gqa", "rwkv_cmix")
    ids = torch.tensor([tokenizer.encode("the bird sat")])
    hf = AutoModelForCausalLM.from_pretrained(folder)
    expected = generate(model, ids, max_new_tokens=8)[0].tokens
    assert hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[
        0, ids.shape[1] :
    ].tolist() == (expected)


def test_a_hybrid_round_trips_without_its_yamls(tokenizer, tmp_path: Path) -> None:
    pattern = "model.layer_pattern=[rwkv6,{name:gqa,num_kv_heads:1}]"
    model, folder = saved_model(
        tokenizer, tmp_path / "model", "rwkv6", "swiglu", "model.num_layers=4", pattern
    )
    layers = json.loads((folder / "config.json").read_text())["model"]["layer_pattern"]
    assert [layer["name"] for layer in layers] == ["rwkv6", "gqa", "rwkv6", "gqa"]
    assert layers[1]["num_kv_heads"] == 1 and "num_heads" in layers[0]  # every option written out
    ids = torch.tensor([tokenizer.encode("the queen sat")])
    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(StackedMixinForCausalLM.from_pretrained(folder)(ids).logits, model(ids).logits)
        assert torch.equal(hf(ids).logits, model(ids).logits)
    expected = generate(model, ids, max_new_tokens=8)[0].tokens
    assert hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[
        0, ids.shape[1] :
    ].tolist() == (expected)


def test_tokenizer_and_generation_config(tokenizer, tmp_path: Path) -> None:
    _, folder = saved_model(tokenizer, tmp_path / "model", "retnet")
    hf_tok = AutoTokenizer.from_pretrained(folder)
    text = "the queen said: sing!"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.decode(tokenizer.encode(text)) == text
    assert hf_tok.eos_token_id == tokenizer.eos_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_id
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "archifactory" and config["mixin"]["name"] == "retnet"
    assert not any("archifactory." in str(value) for value in config.values())  # names, never import paths


def test_labels_give_the_shifted_next_token_loss(tokenizer, tmp_path: Path) -> None:
    model, folder = saved_model(tokenizer, tmp_path / "model", "mamba2")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("the king sat on the mat")])
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, labels=ids).loss, model(ids, targets=targets).loss)


def test_a_damaged_weights_file_is_refused_in_one_line(tokenizer, tmp_path: Path) -> None:
    _, folder = saved_model(tokenizer, tmp_path / "model", "gqa")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    for load in (StackedMixinForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ArchiFactoryError) as error:
            load(folder)
        assert "damaged" in one_line(error)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(ArchiFactoryError, match="damaged"):
        StackedMixinForCausalLM.from_pretrained(folder)


def test_an_unknown_component_is_refused_in_one_line(tokenizer, tmp_path: Path) -> None:
    _, folder = saved_model(tokenizer, tmp_path / "model", "gqa")
    config = json.loads((folder / "config.json").read_text())
    config["mixin"]["name"] = "transformer_xl"
    (folder / "config.json").write_text(json.dumps(config))
    for load in (StackedMixinForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ArchiFactoryError) as error:
            load(folder)
        assert "unknown mixin 'transformer_xl'" in one_line(error)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ArchiFactoryError, match="not an ArchiFactory model"):
        StackedMixinForCausalLM.from_pretrained(folder)


def test_a_left_padded_batch_samples_reproducibly(tokenizer, tmp_path: Path) -> None:
    """Sampling over a padded batch: the same seed gives the same rows."""
    _, folder = saved_model(tokenizer, tmp_path / "model", "gqa")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    _, ids, mask = left_padded_prompts(tokenizer)
    options = {"max_new_tokens": 8, "do_sample": True, "eos_token_id": None, "pad_token_id": 0}
    torch.manual_seed(0)
    produced = hf.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(0)
    assert torch.equal(hf.generate(ids, attention_mask=mask, **options), produced)


def test_right_padding_in_generate_is_refused_in_one_line(tokenizer, tmp_path: Path) -> None:
    _, folder = saved_model(tokenizer, tmp_path / "model", "gqa")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(ArchiFactoryError, match="right-padded") as error:
        hf.generate(
            ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2, pad_token_id=0
        )
    one_line(error)


def test_import_archifactory_registers_the_auto_classes_lazily(tokenizer, tmp_path: Path) -> None:
    _, folder = saved_model(tokenizer, tmp_path / "model", "lstm")
    script = (
        "import sys, archifactory\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"  # the CLI stays fast
        # a finished run writes its model/ folder without transformers' modeling code (~3 s of imports)
        "import archifactory.hf.write\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        "print(type(model).__name__, tok.eos_token_id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ArchiFactoryForCausalLM", str(tokenizer.eos_id)]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        ArchiFactoryForCausalLM.__name__
    ]

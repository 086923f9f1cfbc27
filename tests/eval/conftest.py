"""Small real pieces for the eval tests: a byte-level BPE trained on templated text and tiny models."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch

from archifactory.data.tokenizer import Tokenizer, train_bpe
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import RotaryPositional
from archifactory.model.stack import StackedMixinForCausalLM

WORDS = (
    "the cat dog sat ran on a mat big small red king queen said to her and then over tree bird sang".split()
)


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"the {rng.choice(WORDS)} {rng.choice(WORDS)} on the {rng.choice(WORDS)}." for _ in range(count)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 400-token byte-level BPE: common words are single tokens (" mat"), so merges cross boundaries."""
    target = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe([" ".join(sentences(400))], 400, target)


def tiny_model(vocab_size: int, max_seq_len: int = 64, seed: int = 0) -> StackedMixinForCausalLM:
    torch.manual_seed(seed)
    model = StackedMixinForCausalLM(
        num_layers=2,
        hidden_size=32,
        vocab_size=vocab_size,
        mixin_module=functools.partial(GroupedQueryAttention, hidden_size=32, num_heads=4, num_kv_heads=2),
        ffn_module=functools.partial(SwiGLU, hidden_size=32),
        positional_module=RotaryPositional(32, max_seq_len),
        initializer_range=0.2,  # large weights: peaked, input-dependent distributions
    )
    return model.eval()


def write_corpus(folder: Path, documents: int = 60, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = sentences(documents * 6, seed)
    for part in range(documents // 20):
        chunk = texts[part * 120 : (part + 1) * 120]
        (folder / f"part{part}.txt").write_text(
            "\n\n".join(" ".join(chunk[i : i + 6]) for i in range(0, 120, 6))
        )
    return folder

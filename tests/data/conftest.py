"""Small corpora written to tmp_path, and a DatasetConfig factory with a private cache per test."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from archifactory.config.schema import DatasetConfig

WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the a king queen fool sword crown night day love war peace river stone bird sings falls rises speaks "
    "whispers golden silent ancient my thy good ill fortune, heart; honour! why? naïve café — 1 22 333"
).split()


def make_text(seed: int, sentences: int = 30) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".")
        if rng.random() < 0.2:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of 12 small .txt documents."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc_{i:02d}.txt").write_text(make_text(i), encoding="utf-8")
    return folder


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DatasetConfig]:
    def make(**overrides) -> DatasetConfig:
        values = {"name": "text", "source": "text", "vocab_size": 300, "val_fraction": 0.25,
                  "cache_dir": str(tmp_path / "cache"), **overrides}  # fmt: skip
        return DatasetConfig(**values)

    return make

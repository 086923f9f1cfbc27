"""Train a real (tiny, few-second) run directory for tests of what reads runs: generate, eval, export."""

from __future__ import annotations

import random
from pathlib import Path

from archifactory.train.loop import train
from tests.helpers import compose_config

WORDS = (
    "the cat dog sat ran on a mat big small red king queen said to her and then over tree bird sang".split()
)


def write_small_corpus(folder: Path, documents: int = 120, seed: int = 0) -> Path:
    """Templated sentences in a few .txt files: enough for a 512-token BPE and a falling loss."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(max(1, documents // 40)):
        stories = [
            " ".join(
                f"the {rng.choice(WORDS)} {rng.choice(WORDS)} on the {rng.choice(WORDS)}."
                for _ in range(rng.randint(3, 8))
            )
            for _ in range(40)
        ]
        (folder / f"part{part}.txt").write_text("\n\n".join(stories))
    return folder


def train_tiny_run(run_dir: Path, corpus: Path, cache: Path, *overrides: str) -> dict:
    """A 2-layer, 64-wide model on `corpus` for `trainer=smoke` (20 steps); returns summary.json."""
    cfg = compose_config(
        [
            "dataset=text",
            f"dataset.path={corpus}",
            f"dataset.cache_dir={cache}",
            "dataset.vocab_size=512",
            "model=tiny",
            "model.hidden_size=64",
            "model.num_layers=2",
            "trainer=smoke",
            "trainer.lr=1e-2",
            f"run_name={run_dir.name}",
            *overrides,
        ]
    )
    return train(cfg, run_dir, list(overrides))

"""What a run writes is readable by the group and others as the umask allows (issue #30, item 9): no
0600 `model.safetensors` and no 0700 `model/`, `tokenizer/`, checkpoint or token-cache folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from archifactory.train.loop import train
from tests.train.test_loop import smoke_config, write_corpus


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    previous = os.umask(umask)
    try:
        train(smoke_config(corpus, tmp_path / "cache", "trainer.max_steps=2"), tmp_path / "run")
    finally:
        os.umask(previous)
    written = modes(tmp_path / "run") | {f"cache/{k}": v for k, v in modes(tmp_path / "cache").items()}
    for name in (
        "model",
        "model/model.safetensors",
        "tokenizer",
        "checkpoints/step_0000002/model.safetensors",
    ):
        assert name in written, name
    for name, mode in written.items():
        folder = (tmp_path / "run" / name).is_dir() or (tmp_path / name).is_dir()
        expected = (0o777 if folder else 0o666) & ~umask
        assert mode & ~0o111 == expected & ~0o111, f"{name}: {oct(mode)} under umask {oct(umask)}"
        if folder:
            assert mode == expected, f"{name}: {oct(mode)} under umask {oct(umask)}"

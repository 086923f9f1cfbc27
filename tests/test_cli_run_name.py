"""The default run name names the dataset's identity (issue #30, item 4): another corpus is another
directory, so a mistyped `dataset.path` reads "does not exist" rather than "already holds a run"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from archifactory.config.resolvers import dataset_digest
from tests.cli_helpers import run_cli
from tests.helpers import compose_config
from tests.test_cli import ENV
from tests.train.test_loop import write_corpus


def test_run_name_digest_follows_the_dataset_identity() -> None:
    name = lambda *o: compose_config(["dataset=text", *o]).run_name  # noqa: E731
    assert name("dataset.path=/data/a") == "gqa_swiglu_rope_tiny_text-b7be7e_s0"
    assert name("dataset.path=/data/a") != name("dataset.path=/data/b")
    assert name("dataset.path=/data/a") != name("dataset.path=/data/a", "dataset.vocab_size=300")
    assert name("dataset.path=/data/a") != name("dataset.path=/data/a", "dataset.doc_separator=x")
    # where and how the cache is kept is not the data's identity
    assert name("dataset.path=/data/a") == name("dataset.path=/data/a", "dataset.cache_dir=/elsewhere")
    assert name("dataset.path=/data/a") == name("dataset.path=/data/a", "dataset.rebuild=true")
    hub = compose_config(["dataset=hf", "dataset.path=org/set"])
    assert (
        hub.run_name != compose_config(["dataset=hf", "dataset.path=org/set", "dataset.hf_config=x"]).run_name
    )


def test_digest_is_the_same_in_another_process() -> None:
    node = compose_config(["dataset=text", "dataset.path=/data/a"]).dataset
    code = (
        "from tests.helpers import compose_config\n"
        "from archifactory.config.resolvers import dataset_digest\n"
        "print(dataset_digest(compose_config(['dataset=text', 'dataset.path=/data/a']).dataset))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], env=ENV | {"PYTHONHASHSEED": "7"}, capture_output=True, text=True
    )
    assert other.stdout.strip() == dataset_digest(node)


def test_a_mistyped_path_next_to_a_completed_run_does_not_exist(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    common = [
        "dataset=text",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.vocab_size=300",
        "model.hidden_size=32",
        "model.num_layers=1",
        "trainer=smoke",
        "trainer.max_steps=2",
    ]
    done = run_cli("train", *common, f"dataset.path={corpus}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(runs) == 1 and runs[0].startswith("gqa_swiglu_rope_tiny_text-")
    typo = run_cli("train", *common, f"dataset.path={corpus}x", cwd=tmp_path)
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines() == [
        f"error: dataset.path={corpus}x does not exist; point it at a file, a folder or a glob"
    ]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == runs, "no folder for the typo"


def test_a_run_refused_while_reading_its_data_leaves_no_folder(tmp_path: Path) -> None:
    binary = tmp_path / "corpus" / "blob.txt"
    binary.parent.mkdir()
    binary.write_bytes(bytes(range(256)) * 8)
    result = run_cli("train", "dataset=text", f"dataset.path={binary.parent}", "trainer=smoke", cwd=tmp_path)
    assert result.returncode == 1 and "looks binary" in result.stderr
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or list(outputs.iterdir()) == []

"""A verb whose optional package is missing ends in one line naming the extra to install (issue #30,
item 7), e.g. `error: lm-eval is not installed; install the eval extra: pip install -e ".[eval]"`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from archifactory.cli import guard
from archifactory.train.loop import train
from tests.test_cli import ENV
from tests.train.test_loop import smoke_config, write_corpus

# Imports of the named top-level modules fail as they do when the package is not installed.
BLOCK = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
from archifactory.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def cli_without(blocked: set[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = BLOCK.format(blocked=blocked)
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extras")
    corpus = write_corpus(root / "corpus")
    train(smoke_config(corpus, root / "cache", "trainer.max_steps=2"), root / "run")
    return root / "run"


def test_eval_without_lm_eval_names_the_eval_extra(run_dir: Path, tmp_path: Path) -> None:
    result = cli_without({"lm_eval"}, "eval", "hellaswag", f"run={run_dir}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: lm-eval is not installed; install the eval extra: pip install -e ".[eval]"'
    ]


def test_slurm_sweep_without_submitit_names_the_slurm_extra(tmp_path: Path) -> None:
    args = ["train", "-m", "hydra/launcher=slurm", "trainer=smoke", "dataset=text", "dataset.path=x"]
    result = cli_without({"submitit"}, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: hydra-submitit-launcher is not installed; install the slurm extra: pip install -e ".[slurm]"'
    ]


def test_launcher_config_missing_without_the_plugin_names_the_slurm_extra() -> None:
    # what Hydra raises when hydra-submitit-launcher is absent: its configs were never registered
    error = MissingConfigException(
        "Could not load 'hydra/launcher/submitit_slurm'.", "hydra/launcher/submitit_slurm"
    )
    assert guard.config_error_line(error) == guard.extra_line("hydra-submitit-launcher", "slurm")


def test_other_missing_modules_keep_the_unexpected_error_line() -> None:
    assert guard.missing_extra_line(ModuleNotFoundError("No module named 'yaml'", name="yaml")) is None
    assert guard.missing_extra_line(
        ModuleNotFoundError("No module named 'fla.ops.x'", name="fla.ops.x")
    ) == guard.extra_line("flash-linear-attention", "fla")

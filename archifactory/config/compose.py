"""Composing a run config from the config dir: the one place that knows where the YAMLs live.

    from archifactory.config.compose import compose
    cfg = compose(["mixin=rwkv6", "model=tiny"])        # what `archifactory train mixin=rwkv6 model=tiny` runs

`composer()` keeps one Hydra context open for many configs (`list --params`, benchmarks). The packaged
configs (a wheel install) or the repository's `configs/` (an editable install) are used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from archifactory.config.schema import register_configs

GROUPS = (
    "mixin",
    "ffn",
    "positional",
    "residual",
    "dataset",
    "task",
    "mqar_cell",
    "trainer",
    "grpo",
    "model",
    "experiment",
)


def config_dir() -> Path:
    """The packaged configs (wheel install) or the repository's `configs/` (editable install)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "configs"
    if packaged.is_dir():
        return packaged
    return package.parent / "configs"


def group_options(group: str) -> dict[str, str]:
    """Option name -> its one-line description (the first comment line of its YAML)."""
    options: dict[str, str] = {}
    for path in sorted((config_dir() / group).glob("*.yaml")):
        description = ""
        for line in path.read_text().splitlines():
            if line.startswith("#") and not line.startswith("# @package"):
                description = line.lstrip("# ").strip()
                break
        options[path.stem] = description
    return options


@contextlib.contextmanager
def composer() -> Iterator[Callable[[Sequence[str]], DictConfig]]:
    """A function composing `config.yaml` with overrides, valid inside this context (one Hydra context)."""
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda overrides: hydra_compose(config_name="config", overrides=list(overrides))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed run config for `overrides` (Hydra's override syntax), as `archifactory train` sees it."""
    with composer() as make:
        return make(overrides)

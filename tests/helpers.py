"""Test helpers: compose the real configs with Hydra's compose API."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from archifactory.cli import config_dir
from archifactory.config import register_configs


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])

"""Test helpers: compose the real configs (`archifactory.config.compose`)."""

from __future__ import annotations

from omegaconf import DictConfig

from archifactory.config.compose import compose


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    return compose(overrides or [])

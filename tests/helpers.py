"""Test helpers: compose the real configs (`archifactory.config.compose`)."""

from __future__ import annotations

import copy
import functools

from omegaconf import DictConfig

from archifactory.config.compose import compose


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose(overrides)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for `overrides`, each override list composed once per test process (a Hydra
    composition costs ~0.3 s; the registry suites compose the same few hundred configs thousands of times).
    A copy is returned, so a test may change its config freely."""
    return copy.deepcopy(_composed(tuple(overrides or ())))

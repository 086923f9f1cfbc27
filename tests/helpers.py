"""Test helpers: compose the real configs (`archifactory.config.compose`)."""

from __future__ import annotations

import copy
import functools
import re

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from archifactory.config.compose import compose

# `a.b=value`: a value in the composed config. Such an override never changes the defaults list (group
# choices are `group=option`; additions `+`, deletions `~`, packages `@` and `hydra.` keys are left out)
VALUE_OVERRIDE = re.compile(r"(?!hydra\.)[A-Za-z_]\w*(\.\w+)+=")


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """Hydra composes the group choices (once per distinct set, ~0.2 s each); the value overrides are then
    applied to a copy by Hydra's own override step (same parser, same struct/schema checks, same
    `ConfigCompositionException`s), which is what Hydra does after composing the defaults list."""
    values = OverridesParser.create().parse_overrides([o for o in overrides if VALUE_OVERRIDE.match(o)])
    if not values or any(o.is_sweep_override() for o in values):  # a sweep: Hydra's compose refuses it
        return compose(overrides)
    cfg = copy.deepcopy(_composed(tuple(o for o in overrides if not VALUE_OVERRIDE.match(o))))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for `overrides`, each override list composed once per test process (a Hydra
    composition costs ~0.3 s; the registry suites compose the same few hundred configs thousands of times,
    most of them differing only in values such as `model.hidden_size=64`). A copy is returned, so a test
    may change its config freely."""
    return copy.deepcopy(_composed(tuple(overrides or ())))

"""Test helpers: compose the real configs (`archifactory.config.compose`)."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
from pathlib import Path

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from archifactory.config.compose import compose, config_dir

# `a.b=value`, or `key=value` whose key is no config group (`seed=1`, `run_name=x`, `init_from=<run>`): a value
# in the composed config. Such an override never changes the defaults list (group choices are `group=option`;
# additions `+`, deletions `~`, packages `@` and `hydra.` keys are left out)
OVERRIDE_KEY = re.compile(r"(?!hydra\.)([A-Za-z_]\w*)((?:\.\w+)*)=")
CONFIG_GROUPS = frozenset(path.name for path in config_dir().iterdir() if path.is_dir())


def _is_value(override: str) -> bool:
    key = OVERRIDE_KEY.match(override)
    return key is not None and (key[2] != "" or key[1] not in CONFIG_GROUPS)


# `group=option`: a plain choice of one option (no sweep, addition `+`, deletion `~`, package `@` or hydra/ group)
GROUP_CHOICE = re.compile(r"([a-z_]+)=([\w.-]+)$")


def _primary_choices() -> dict[str, str]:
    """config.yaml's own group choices (`mixin: gqa`, `ffn: swiglu`, ...)."""
    entries = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return {
        k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items() if " " not in k and v
    }


def _groups_with_an_option_holding(marker: str) -> set[str]:
    """Groups with an option whose YAML holds `marker`."""
    return {path.parent.name for path in config_dir().glob("*/*.yaml") if marker in path.read_text()}


PRIMARY_CHOICES = _primary_choices()
# groups whose options choose other groups' options (`experiment`, `task`: `override /dataset: mad`)
GROUPS_CHOOSING_OTHERS = _groups_with_an_option_holding("override /")
# groups whose options set only their own node: no other group's choice, no `# @package _global_` (`task`,
# `mqar_cell` set keys elsewhere). A mixin beside other such choices is their composition with the mixin's
# node put in (`_node_choice`)
NODE_GROUP = "mixin"
GROUPS_OF_OWN_NODE = CONFIG_GROUPS - GROUPS_CHOOSING_OTHERS - _groups_with_an_option_holding("@package")


def _one_key(choices: tuple[str, ...]) -> tuple[str, ...]:
    """One cache key per composition: `mixin=rwkv6 ffn=swiglu positional=rope` and `mixin=rwkv6` compose the
    same config (swiglu and rope are config.yaml's choices), and plain choices of distinct groups compose
    the same in any order. Left as given when a group is chosen twice, a choice is not plain, or a chosen
    option may choose other groups itself (an experiment's `mixin: gqa` is not config.yaml's)."""
    parsed = [GROUP_CHOICE.match(choice) for choice in choices]
    if not all(parsed):
        return choices
    groups = [match[1] for match in parsed]
    if len(set(groups)) < len(groups) or GROUPS_CHOOSING_OTHERS & set(groups):
        return choices
    return tuple(sorted(match[0] for match in parsed if PRIMARY_CHOICES.get(match[1]) != match[2]))


# A folder the xdist workers of one test session share (`share_compositions`, tests/conftest.py): a composition
# one worker made, another reads back instead of composing it again; empty: this process composes its own
_shared: list[Path] = []


def share_compositions(folder: Path) -> None:
    """Compositions go to (and come from) `folder`, one pickle per distinct composition."""
    folder.mkdir(parents=True, exist_ok=True)
    _shared[:] = [folder]


def _node_choice(choices: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(`mixin=<m>`, the other choices) when `choices` (a key of `_one_key`) choose a mixin beside options that
    each set their own group's node alone; None otherwise."""
    parsed = [GROUP_CHOICE.match(choice) for choice in choices]
    if len(choices) < 2 or not all(parsed):
        return None
    groups = [match[1] for match in parsed]
    if (
        groups.count(NODE_GROUP) != 1
        or len(set(groups)) < len(groups)
        or not set(groups) <= GROUPS_OF_OWN_NODE
    ):
        return None
    mixin = next(match[0] for match in parsed if match[1] == NODE_GROUP)
    return mixin, tuple(match[0] for match in parsed if match[1] != NODE_GROUP)


@functools.cache
def _composed_choices(choices: tuple[str, ...]) -> bytes:
    """Hydra's composition of group choices (~0.2 s each), once per distinct composition (`_one_key`) and test
    session, pickled (a composed config pickles: archifactory/config/schema.py). A mixin beside other choices
    is the mixin's node put into the composition of the others (`_node_choice`): the registry suites compose
    every mixin under several other choices (a training recipe, `positional=none`, `ffn=moe`), and each mixin
    and each set of other choices is then composed once (tests/test_compose_helper.py holds it equal)."""
    node_choice = _node_choice(choices)
    if node_choice is not None:
        mixin, others = node_choice
        cfg = pickle.loads(_composed_choices(others))
        cfg.mixin = pickle.loads(_composed_choices((mixin,))).mixin
        return pickle.dumps(cfg)
    if not _shared:
        return pickle.dumps(compose(choices))
    path = _shared[0] / f"{hashlib.sha256(repr(choices).encode()).hexdigest()}.pickle"
    if path.is_file():
        return path.read_bytes()
    pickled = pickle.dumps(compose(choices))
    partial = path.with_name(f"{path.name}.{os.getpid()}")  # written whole, then renamed: never read half
    partial.write_bytes(pickled)
    partial.replace(path)
    return pickled


@functools.cache
def _composed(overrides: tuple[str, ...]) -> bytes:
    """Hydra composes the group choices; the value overrides are then applied to a copy by Hydra's own
    override step (same parser, same struct/schema checks, same `ConfigCompositionException`s), which is
    what Hydra does after composing the defaults list."""
    values = OverridesParser.create().parse_overrides([o for o in overrides if _is_value(o)])
    if any(o.is_sweep_override() for o in values):  # a sweep: Hydra's compose refuses it
        return pickle.dumps(compose(overrides))
    choices = _composed_choices(_one_key(tuple(o for o in overrides if not _is_value(o))))
    if not values:
        return choices
    cfg = pickle.loads(choices)
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return pickle.dumps(cfg)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for `overrides`, each composition made once per test session (a Hydra
    composition costs ~0.2 s; the registry suites compose the same few hundred configs thousands of times,
    most of them differing only in values such as `model.hidden_size=64`). A copy is returned (unpickled:
    5x faster than a deep copy), so a test may change its config freely."""
    return pickle.loads(_composed(tuple(overrides or ())))

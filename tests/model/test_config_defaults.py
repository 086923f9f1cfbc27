"""Every component YAML agrees with its constructor: a key the YAML sets to a literal equals the
constructor's default for it (or the YAML should not repeat it), so `mixin=gla` in a run and `GLA(...)`
in a notebook build the same layer. Values taken from the model (`${model.num_heads}`) are not defaults
and are skipped; a key the constructor does not take fails too (the schema would refuse it anyway).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from archifactory.core.registry import components

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = [
    (kind, path)
    for kind in ("mixin", "ffn", "positional")
    for path in sorted((CONFIGS / kind).glob("*.yaml"))
]


def literal_options(path: Path) -> dict[str, object]:
    """The YAML's keys with literal values (no `defaults` list, no `${...}` interpolations)."""
    raw = OmegaConf.load(path)
    return {key: raw[key] for key in raw if key != "defaults" and not OmegaConf.is_interpolation(raw, key)}


def test_every_component_config_is_checked() -> None:
    checked = {(kind, path.stem) for kind, path in FILES}
    for kind in ("mixin", "ffn", "positional"):
        assert {(kind, name) for name in components(kind)} <= checked


@pytest.mark.parametrize("kind,path", FILES, ids=[f"{kind}/{path.stem}" for kind, path in FILES])
def test_yaml_values_equal_the_constructor_defaults(kind: str, path: Path) -> None:
    cls = components(kind)[path.stem]
    params = inspect.signature(cls.__init__).parameters
    for key, value in literal_options(path).items():
        assert key in params, f"configs/{kind}/{path.name}: {key} is not an option of {cls.__name__}"
        default = params[key].default
        assert default is not inspect.Parameter.empty, (
            f"configs/{kind}/{path.name}: {key} has no constructor default; give {cls.__name__} one"
        )
        assert value == default and type(value) is type(default), (
            f"configs/{kind}/{path.name}: {key}={value!r} but {cls.__name__} defaults to {default!r}; "
            "make them agree (or drop the key from the YAML)"
        )

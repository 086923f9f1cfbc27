"""Names -> component classes. The only place that maps a config name to a class.

Components register themselves with a decorator in their own file; importing
`archifactory.model.mixins` / `archifactory.model.ffn` / `archifactory.model.residual` imports every file
in those folders, so a new file is picked up with no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from archifactory.core.errors import ArchiFactoryError

T = TypeVar("T", bound=type)

MIXINS: dict[str, type] = {}
FFNS: dict[str, type] = {}
POSITIONALS: dict[str, type] = {}
RESIDUALS: dict[str, type] = {}

_KINDS: dict[str, dict[str, type]] = {
    "mixin": MIXINS,
    "ffn": FFNS,
    "positional": POSITIONALS,
    "residual": RESIDUALS,
}
_PACKAGES = (
    "archifactory.model.mixins",
    "archifactory.model.ffn",
    "archifactory.model.positional",
    "archifactory.model.residual",
)
_loaded = False


def _register(kind: str, name: str):
    def decorator(cls: T) -> T:
        table = _KINDS[kind]
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} name {name!r} is registered twice ({table[name]} and {cls})")
        table[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def register_mixin(name: str):
    return _register("mixin", name)


def register_ffn(name: str):
    return _register("ffn", name)


def register_positional(name: str):
    return _register("positional", name)


def register_residual(name: str):
    return _register("residual", name)


def load_components() -> None:
    """Import every component module so that their decorators run."""
    global _loaded
    if _loaded:
        return
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _loaded = True


def components(kind: str) -> dict[str, type]:
    load_components()
    return _KINDS[kind]


def get_component(kind: str, name: str) -> type:
    table = components(kind)
    if name not in table:
        raise ArchiFactoryError(
            f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))} (see `archifactory list`)"
        )
    return table[name]

"""Register ArchiFactory with transformers' Auto classes as soon as transformers loads them.

`import archifactory` must make `AutoModelForCausalLM.from_pretrained(<model/ folder>)` work, but importing
transformers' modeling code costs seconds that every CLI call (`archifactory list`, …) would pay. So
`archifactory/__init__.py` registers at once what transformers has already loaded, and otherwise installs
this import hook: right after `configuration_auto` finishes loading, `AutoConfig` learns our config; right
after `modeling_auto` does, `AutoModelForCausalLM` learns our model.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType


def _register_config() -> None:
    from archifactory.hf.config import register_auto_config

    register_auto_config()


def _register_model() -> None:
    from archifactory.hf.model import register_auto_classes

    register_auto_classes()


# module -> (the attribute that shows it finished loading, what to register then)
ACTIONS: dict[str, tuple[str, Callable[[], None]]] = {
    "transformers.models.auto.configuration_auto": ("AutoConfig", _register_config),
    "transformers.models.auto.modeling_auto": ("AutoModelForCausalLM", _register_model),
}


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of the ACTIONS modules to register after they run."""

    def find_spec(self, fullname: str, path, target: ModuleType | None = None):
        if fullname not in ACTIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                load, action = spec.loader.exec_module, ACTIONS[fullname][1]

                def exec_module(module: ModuleType, load=load, action=action) -> None:
                    load(module)
                    action()

                spec.loader.exec_module = exec_module  # this spec's own loader instance
            return spec
        return None


_hook = RegisterAfterImport()


def loaded(name: str) -> bool:
    """Whether module `name` has finished loading (a partially initialised one lacks its main class)."""
    attribute = ACTIONS[name][0]
    return name in sys.modules and hasattr(sys.modules[name], attribute)


def install() -> None:
    """Register what transformers has loaded already; hook the loading of the rest."""
    for name, (_, action) in ACTIONS.items():
        if loaded(name):
            action()
    if not all(loaded(name) for name in ACTIONS) and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)

"""`register_configs` runs before every composition and stores a schema only when the ConfigStore does not
hold it already: a component registered later, and an entry removed or replaced, are stored (again)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from archifactory.config.schema import register_configs
from archifactory.core import registry
from archifactory.model.ffn.swiglu import SwiGLU


def held(group: str, name: str) -> object | None:
    return ConfigStore.instance().repo.get(group, {}).get(f"{name}.yaml")


def test_a_component_registered_later_is_stored() -> None:
    register_configs()
    assert held("ffn", "_schema__later") is None

    class Later(SwiGLU):
        pass

    registry.FFNS["_later"] = Later
    try:
        register_configs()
        entry = held("ffn", "_schema__later")
        assert entry is not None and entry.node.name == "_later"
    finally:
        del registry.FFNS["_later"]
        del ConfigStore.instance().repo["ffn"]["_schema__later.yaml"]


def test_an_entry_removed_or_replaced_is_stored_again() -> None:
    register_configs()
    first = held("mixin", "_schema_gqa")
    register_configs()
    assert held("mixin", "_schema_gqa") is first  # held already: not converted again
    del ConfigStore.instance().repo["mixin"]["_schema_gqa.yaml"]
    register_configs()
    assert held("mixin", "_schema_gqa") is not None
    ConfigStore.instance().store(group="mixin", name="_schema_gqa", node={"name": "replaced"})
    register_configs()
    assert held("mixin", "_schema_gqa").node.name == "gqa"

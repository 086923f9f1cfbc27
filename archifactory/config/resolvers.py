"""OmegaConf resolvers the configs use. Registered on `import archifactory`, so a saved run config that
still holds its interpolations resolves wherever it is loaded (training, eval, export, report)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _variant(mixin: str, layer_pattern: Any, attention_every: int, attention_mixin: str) -> str:
    from archifactory.config.hybrid import variant_label  # lazy: keeps `import archifactory` light

    return variant_label(mixin, layer_pattern, attention_every, attention_mixin)


def register_resolvers() -> None:
    """`${variant:mixin,layer_pattern,attention_every,attention_mixin}`: the mixin part of a run name."""
    if not OmegaConf.has_resolver("variant"):
        OmegaConf.register_new_resolver("variant", _variant)

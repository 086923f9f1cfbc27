"""OmegaConf resolvers the configs use. Registered on `import archifactory`, so a saved run config that
still holds its interpolations resolves wherever it is loaded (training, eval, export, report)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def _variant(
    mixin: str, layer_pattern: Any, attention_every: int, attention_mixin: str, residual: str = "standard"
) -> str:
    from archifactory.config.hybrid import run_name_label  # lazy: keeps `import archifactory` light

    return run_name_label(mixin, layer_pattern, attention_every, attention_mixin, residual)


def register_resolvers() -> None:
    """`${variant:mixin,layer_pattern,attention_every,attention_mixin[,residual]}`: the variant part of a run
    name (a run config saved before the residual group passes four arguments)."""
    if not OmegaConf.has_resolver("variant"):
        OmegaConf.register_new_resolver("variant", _variant)

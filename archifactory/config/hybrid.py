"""Hybrid layer patterns: which mixin each layer gets.

`model.layer_pattern` lists per-layer mixins, repeated to the depth (layer i takes entry i mod length).
An entry is a mixin name (`gqa`) or a mapping with `name` and options for that entry only
(`{name: gqa, num_kv_heads: 1}`). An entry naming the selected `mixin=` starts from `cfg.mixin`, so
`mixin.*` overrides reach it; any other entry starts from its own `configs/mixin/<name>.yaml`. Every entry
is checked against its mixin's schema (unknown options and wrong types fail with one line).

`model.attention_every=k` is the shorthand for the common hybrid "every k-th layer is attention": layers
k−1, 2k−1, … take `model.attention_mixin` (default `gqa`), the others `mixin=`.
"""

from __future__ import annotations

import copy
from itertools import groupby
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from archifactory.config.compose import config_dir
from archifactory.config.schema import component_schema
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components


def _hybrid_keys(cfg: Any) -> tuple[Any, int, str]:
    """(layer_pattern, attention_every, attention_mixin); a run config saved before hybrids existed has none
    of the keys and is a uniform stack."""
    model = cfg.model
    return (
        model.get("layer_pattern"),
        model.get("attention_every") or 0,
        model.get("attention_mixin") or "gqa",
    )


def pattern_entries(cfg: Any) -> list[Any] | None:
    """The pattern as a list of entries (names or mappings), or None for a uniform stack."""
    layer_pattern, every, attention_mixin = _hybrid_keys(cfg)
    if layer_pattern and every:
        raise ArchiFactoryError(
            "model.layer_pattern and model.attention_every both set; use one (attention_every=k is the "
            "shorthand for a pattern of k-1 × mixin then attention)"
        )
    if layer_pattern:
        return list(layer_pattern)
    if every:
        if every < 1:
            raise ArchiFactoryError(f"model.attention_every={every} must be >= 1 (0 = no hybrid)")
        return [cfg.mixin.name] * (every - 1) + [attention_mixin]
    return None


def _entry_name_and_options(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, (dict, DictConfig)) and "name" in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        return str(entry["name"]), options
    raise ArchiFactoryError(
        f"model.layer_pattern entry {entry!r} is neither a mixin name nor a mapping with a `name`; "
        "write e.g. [gated_deltanet, {name: gqa, num_kv_heads: 1}]"
    )


def _defaults_of(name: str, cfg: Any) -> DictConfig:
    """The composed `configs/mixin/<name>.yaml` (interpolations such as ${model.num_heads} resolved
    against the run's config)."""
    raw = OmegaConf.load(config_dir() / "mixin" / f"{name}.yaml")
    with open_dict(raw):
        raw.pop("defaults", None)
    root = copy.deepcopy(cfg)
    with open_dict(root):
        root["_layer_entry"] = raw
    return OmegaConf.create(OmegaConf.to_container(root["_layer_entry"], resolve=True))


def entry_config(cfg: Any, entry: Any) -> DictConfig:
    """One pattern entry as a full, validated mixin config (like `cfg.mixin`)."""
    name, options = _entry_name_and_options(entry)
    registered = components("mixin")
    if name not in registered:
        raise ArchiFactoryError(
            f"model.layer_pattern: unknown mixin {name!r}; choose from {', '.join(sorted(registered))}"
        )
    if name == cfg.mixin.name:  # a plain copy: cfg.mixin is typed by another instance of the schema class
        base = OmegaConf.create(OmegaConf.to_container(cfg.mixin, resolve=True))
    else:
        base = _defaults_of(name, cfg)
    schema = OmegaConf.structured(component_schema("mixin", name, registered[name]))
    try:
        merged = OmegaConf.merge(schema, base, options)
        OmegaConf.set_readonly(merged, False)
        return merged
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ArchiFactoryError(f"model.layer_pattern entry {name}: {message}") from error


def layer_mixin_configs(cfg: Any) -> list[DictConfig]:
    """The mixin config of every layer, in order."""
    entries = pattern_entries(cfg)
    num_layers = cfg.model.num_layers
    if entries is None:
        return [cfg.mixin] * num_layers
    if not entries:
        raise ArchiFactoryError("model.layer_pattern is empty; list at least one mixin or set it to null")
    configs = [entry_config(cfg, entry) for entry in entries]
    return [configs[i % len(configs)] for i in range(num_layers)]


def variant_label(
    mixin: str,
    layer_pattern: ListConfig | list | None,
    attention_every: int,
    attention_mixin: str,
    residual: str = "standard",
    value_residual: bool = False,
    weights: str = "standard",
) -> str:
    """The model's variant as the report and summary.json's `mixin` show it: the mixin, or the pattern
    run-length encoded (`gated_deltanet3+gqa`), with the non-default depth options in brackets
    (`gqa[residual=mhc]`, `gqa[residual=mhc,value_residual]`, `gqa[weights=hyper]`)."""
    label = _mixin_label(mixin, layer_pattern, attention_every, attention_mixin)
    tags = [tag for tag, _ in _depth_tags(residual, value_residual, weights)]
    return f"{label}[{','.join(tags)}]" if tags else label


def run_name_label(
    mixin: str,
    layer_pattern: ListConfig | list | None,
    attention_every: int,
    attention_mixin: str,
    residual: str = "standard",
    value_residual: bool = False,
    weights: str = "standard",
) -> str:
    """The variant part of a run name: `variant_label` without brackets a shell would glob (`gqa-mhc`,
    `gqa-mhc-vres`, `gqa-hyperw`)."""
    label = _mixin_label(mixin, layer_pattern, attention_every, attention_mixin)
    return "-".join([label, *(short for _, short in _depth_tags(residual, value_residual, weights))])


def _depth_tags(residual: str, value_residual: bool, weights: str = "standard") -> list[tuple[str, str]]:
    """(label tag, run-name tag) of each depth option away from its default: the residual option,
    model.value_residual and model.weights (`hyperw`: `hyper` alone would read as residual=hyper)."""
    tags = [] if residual == "standard" else [(f"residual={residual}", residual)]
    if value_residual:
        tags.append(("value_residual", "vres"))
    if str(weights) != "standard":
        tags.append((f"weights={weights}", f"{weights}w"))
    return tags


def _mixin_label(
    mixin: str, layer_pattern: ListConfig | list | None, attention_every: int, attention_mixin: str
) -> str:
    """The mixin, or the pattern run-length encoded (`gated_deltanet3+gqa`)."""
    if layer_pattern:
        names = [_entry_name_and_options(entry)[0] for entry in layer_pattern]
    elif attention_every and attention_every > 1:
        names = [mixin] * (attention_every - 1) + [attention_mixin]
    elif attention_every == 1:
        names = [attention_mixin]
    else:
        return mixin
    runs = [(name, len(list(group))) for name, group in groupby(names)]
    return "+".join(name if count == 1 else f"{name}{count}" for name, count in runs)


def cfg_variant_label(cfg: Any) -> str:
    """`variant_label` of a composed config (one saved before the residual group has the standard one)."""
    residual = cfg.get("residual")
    return variant_label(
        cfg.mixin.name,
        *_hybrid_keys(cfg),
        "standard" if residual is None else residual.name,
        bool(cfg.model.get("value_residual", False)),
        str(cfg.model.get("weights", "standard")),
    )

"""Reading a Hugging Face format `model/` folder without transformers: its `config.json` and verified weights.

`StackedMixinForCausalLM.from_pretrained` loads with these; `archifactory.hf.model` writes the folder and gives
transformers' Auto classes the same checks. The config names components and options, never import paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.hashing import file_digest

MODEL_TYPE = "archifactory"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREFIX = "model."  # transformers' wrapper holds our model as `self.model`
SECTIONS = ("model", "mixin", "ffn", "positional", "residual")
OPTIONAL_SECTIONS = ("residual",)  # absent from folders exported before the residual group: the standard one


def read_folder_config(folder: Path) -> dict[str, Any]:
    """`config.json` as a dict, refused in one line unless it is an ArchiFactory model's."""
    try:
        raw = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ArchiFactoryError(f"{folder} has no readable {CONFIG} ({error})") from error
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise ArchiFactoryError(f"{folder}/{CONFIG} is not an ArchiFactory model (model_type {found!r})")
    return raw


def check_weights(folder: Path, sha256: str | None) -> Path:
    """The weights file, after checking it against the sha256 `config.json` recorded (when it did)."""
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ArchiFactoryError(f"{folder} has no {WEIGHTS}")
    if sha256 is not None and file_digest(weights) != sha256:
        raise ArchiFactoryError(f"{weights} is damaged (fails the sha256 in {CONFIG}); export the run again")
    return weights


def sections_config(sections: dict[str, Any]) -> DictConfig:
    """The `model`/`mixin`/`ffn`/`positional`(/`residual`) sections as the config the builder reads."""
    present = [kind for kind in SECTIONS if kind not in OPTIONAL_SECTIONS or sections.get(kind) is not None]
    for kind in present:
        part = sections.get(kind)
        if not isinstance(part, dict) or (kind != "model" and not isinstance(part.get("name"), str)):
            raise ArchiFactoryError(
                f"{CONFIG}: `{kind}` must be an object" + (kind != "model") * " with a `name`"
            )
    return OmegaConf.create({kind: sections[kind] for kind in present})


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The saved state dict with the wrapper's `model.` prefix removed."""
    try:
        saved = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ArchiFactoryError(f"{weights} is unreadable ({error})") from error
    return {name.removeprefix(PREFIX): tensor for name, tensor in saved.items()}

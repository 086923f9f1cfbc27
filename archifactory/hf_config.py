"""`ArchiFactoryConfig`: the config.json of a `model/` folder (kept apart from `hf.py` so registering it with
`AutoConfig` needs only transformers' configuration code, not its modeling code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers.configuration_utils import PreTrainedConfig

from archifactory.errors import ArchiFactoryError

if TYPE_CHECKING:
    from archifactory.model.stack import StackedMixinForCausalLM

MODEL_TYPE = "archifactory"


class ArchiFactoryConfig(PreTrainedConfig):
    """A StackedMixinForCausalLM by its config sections, components by registry name and options.

    `model` is the run's `model` section (shape, norm, init, vocab size; a hybrid's `layer_pattern` with
    every layer's mixin written out in full, so loading needs no YAML); `mixin`, `ffn` and `positional` are
    `{"name": …, <options>}` as the YAMLs write them. `hidden_size`, `num_hidden_layers`, `vocab_size` and
    `max_position_embeddings` repeat figures from `model` under the names transformers tooling reads.
    """

    model_type = MODEL_TYPE

    model: dict | None = None
    mixin: dict | None = None
    ffn: dict | None = None
    positional: dict | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    weights_sha256: str | None = None  # of model.safetensors, so a damaged file is refused before loading
    tie_word_embeddings: bool = False  # transformers' own tying stays off: the model ties internally
    use_cache: bool = True

    def build(self) -> StackedMixinForCausalLM:
        """A freshly initialised model of this shape, built through the registry (as training builds it)."""
        from archifactory.model.build import build_model

        for kind in ("model", "mixin", "ffn", "positional"):
            part = getattr(self, kind)
            if not isinstance(part, dict) or (kind != "model" and not isinstance(part.get("name"), str)):
                raise ArchiFactoryError(
                    f"config.json: `{kind}` must be an object" + (kind != "model") * " with a `name`"
                )
        cfg = OmegaConf.create(
            {"model": self.model, "mixin": self.mixin, "ffn": self.ffn, "positional": self.positional}
        )
        try:
            return build_model(cfg, self.model.get("vocab_size") or 0)
        except OmegaConfBaseException as error:  # a key the builder needs is missing from config.json
            raise ArchiFactoryError(f"config.json is incomplete ({str(error).splitlines()[0]})") from error


def register_auto_config() -> None:
    """Make `AutoConfig` resolve model_type `archifactory` (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, ArchiFactoryConfig, exist_ok=True)

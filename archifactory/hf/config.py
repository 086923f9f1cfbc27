"""`ArchiFactoryConfig`: the config.json of a `model/` folder (kept apart from `hf/model.py` so registering it with
`AutoConfig` needs only transformers' configuration code, not its modeling code)."""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig

from archifactory.model.folder import MODEL_TYPE
from archifactory.model.stack import StackedMixinForCausalLM

ARCHITECTURE = "ArchiFactoryForCausalLM"  # config.json's `architectures`: hf/model.py's class of that name


class ArchiFactoryConfig(PreTrainedConfig):
    """A StackedMixinForCausalLM by its config sections, components by registry name and options.

    `model` is the run's `model` section (shape, norm, init, vocab size; a hybrid's `layer_pattern` with
    every layer's mixin written out in full, so loading needs no YAML); `mixin`, `ffn`, `positional` and
    `residual` are `{"name": …, <options>}` as the YAMLs write them (a folder without `residual`, exported
    before the group existed, has the standard residual). `hidden_size`, `num_hidden_layers`, `vocab_size` and
    `max_position_embeddings` repeat figures from `model` under the names transformers tooling reads.
    """

    model_type = MODEL_TYPE

    model: dict | None = None
    mixin: dict | None = None
    ffn: dict | None = None
    positional: dict | None = None
    residual: dict | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    weights_sha256: str | None = None  # of model.safetensors, so a damaged file is refused before loading
    tie_word_embeddings: bool = False  # transformers' own tying stays off: the model ties internally
    use_cache: bool = True

    def build(self) -> StackedMixinForCausalLM:
        """A freshly initialised model of this shape, built through the registry (as training builds it)."""
        return StackedMixinForCausalLM.from_sections(
            {
                "model": self.model,
                "mixin": self.mixin,
                "ffn": self.ffn,
                "positional": self.positional,
                "residual": self.residual,
            }
        )


def register_auto_config() -> None:
    """Make `AutoConfig` resolve model_type `archifactory` (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, ArchiFactoryConfig, exist_ok=True)

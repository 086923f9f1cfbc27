"""`ArchiFactoryConfig`: the config.json of a `model/` folder (kept apart from `hf.py` so registering it with
`AutoConfig` needs only transformers' configuration code, not its modeling code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from transformers.configuration_utils import PreTrainedConfig

from archifactory.errors import ArchiFactoryError

if TYPE_CHECKING:
    from archifactory.model.stack import StackedMixinForCausalLM

MODEL_TYPE = "archifactory"


class ArchiFactoryConfig(PreTrainedConfig):
    """The shape of a StackedMixinForCausalLM and its components by registry name (`{"name": …, options}`)."""

    model_type = MODEL_TYPE

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    vocab_size: int = 256
    max_seq_len: int = 256
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mixin: dict | None = None
    ffn: dict | None = None
    positional: dict | None = None
    weights_sha256: str | None = None  # of model.safetensors, so a damaged file is refused before loading
    tie_word_embeddings: bool = False  # transformers' own tying stays off: the model ties internally
    use_cache: bool = True

    def build(self) -> StackedMixinForCausalLM:
        """A freshly initialised model of this shape, built through the registry (as training builds it)."""
        from archifactory.model.build import build_model

        for kind in ("mixin", "ffn", "positional"):
            part = getattr(self, kind)
            if not isinstance(part, dict) or not isinstance(part.get("name"), str):
                raise ArchiFactoryError(f"config.json: `{kind}` must be an object with a `name`")
        cfg = OmegaConf.create(
            {
                "model": {
                    "num_layers": self.num_layers,
                    "hidden_size": self.hidden_size,
                    "num_heads": self.num_heads,
                    "max_seq_len": self.max_seq_len,
                    "vocab_size": self.vocab_size,
                    "initializer_range": self.initializer_range,
                    "tie_embeddings": self.tie_embeddings,
                    "norm": self.norm,
                    "norm_eps": self.norm_eps,
                    "loss_chunk_size": 0,
                },
                "mixin": self.mixin,
                "ffn": self.ffn,
                "positional": self.positional,
            }
        )
        return build_model(cfg, self.vocab_size)


def register_auto_config() -> None:
    """Make `AutoConfig` resolve model_type `archifactory` (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, ArchiFactoryConfig, exist_ok=True)

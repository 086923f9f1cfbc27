"""Hugging Face format: a config class and a thin `PreTrainedModel` wrapper, registered with the Auto classes.

A finished run writes `<run>/model/` (`hf/write.py`; `archifactory export` writes it for any checkpoint):

    config.json              ArchiFactoryConfig: shape + mixin/ffn/positional/residual by registry name, options
    model.safetensors        the weights (keys `model.<name>` of StackedMixinForCausalLM)
    generation_config.json   EOS / BOS / PAD ids
    tokenizer.json, tokenizer_config.json   the run's tokenizer as a PreTrainedTokenizerFast

Load it without Hydra:

    StackedMixinForCausalLM.from_pretrained("outputs/<run>/model")          # our model
    import archifactory, transformers                                        # the Auto classes, after import
    transformers.AutoModelForCausalLM.from_pretrained("outputs/<run>/model") # ArchiFactoryForCausalLM
    transformers.AutoTokenizer.from_pretrained("outputs/<run>/model")

The config names components and options, never import paths: loading builds them through the same
registry as training (`archifactory.model.build`), so an unknown name is refused with one line. The
wrapper's `generate()` is transformers' own, with the model's explicit decode state as its cache (greedy
and sampling; beam search would need a state reorder no mixin offers). A left-padded batch with its
`attention_mask` (tokenizer.padding_side='left') generates each row exactly as alone: the model masks pad
keys, makes pads identity steps of recurrences and counts positions over real tokens (`model/padding.py`;
transformers' `position_ids` are not needed and are ignored). `forward` also takes right-padded masks
(scoring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from archifactory.core.errors import ArchiFactoryError
from archifactory.hf.config import ArchiFactoryConfig, register_auto_config
from archifactory.model.folder import check_weights, read_folder_config
from archifactory.model.stack import DecodeState


class StateCache:
    """Our `DecodeState` where transformers' `generate()` keeps its cache (`cache=` in and out).

    Not a `transformers.Cache`: the state is per mixin (KV tensors, recurrent matrices, conv buffers),
    so it can neither be cropped nor compiled as one, which these attributes tell `generate()`.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecodeState) -> None:
        self.state = state

    @property
    def is_linear(self) -> list[bool]:
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position


class ArchiFactoryForCausalLM(PreTrainedModel, GenerationMixin):
    """A thin `PreTrainedModel` around StackedMixinForCausalLM, for transformers tooling (generate, HFLM)."""

    config_class = ArchiFactoryConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: ArchiFactoryConfig) -> None:
        super().__init__(config)
        self.model = config.build()
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own state; generate() must not make a DynamicCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights are initialised by the model's own scheme (`model/init.py`) when it is built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embedding

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: StateCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **_: Any,  # transformers passes extras (position_ids, output_attentions…) the model has no use for
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T]; attention_mask [B, T] or [B, past + T] (1 = token, 0 = pad; left padding when
        generating); labels [B, T] unshifted (HF convention), -100 ignored; cache: the decode state."""
        # A state only when generate() asks for one (use_cache=True): a plain forward (scoring, HFLM) takes the
        # training path, which is faster and gives exactly the logits of StackedMixinForCausalLM.forward.
        state = None
        if cache is not None:
            state = cache.state
        elif use_cache:
            state = self.model.init_state(input_ids.shape[0], input_ids.device)
        targets = None
        if labels is not None:  # shift: the target of position t is label t+1
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        out = self.model(input_ids, targets=targets, state=state, attention_mask=attention_mask)
        return CausalLMOutputWithPast(
            loss=out.loss, logits=out.logits, cache=None if out.state is None else StateCache(out.state)
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """transformers' loader, after refusing a local folder whose weights fail their recorded sha256."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            verify_folder(folder)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve model_type `archifactory` (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    register_auto_config()
    AutoModelForCausalLM.register(ArchiFactoryConfig, ArchiFactoryForCausalLM, exist_ok=True)


def read_config(folder: Path) -> ArchiFactoryConfig:
    raw = read_folder_config(folder)
    try:
        return ArchiFactoryConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
    except (TypeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArchiFactoryError(f"{folder}/config.json is invalid ({first})") from error


def verify_folder(folder: Path) -> ArchiFactoryConfig:
    """The folder's config, after checking model.safetensors against the sha256 recorded in config.json."""
    config = read_config(folder)
    check_weights(folder, config.weights_sha256)
    return config

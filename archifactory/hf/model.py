"""Hugging Face format: a config class and a thin `PreTrainedModel` wrapper, registered with the Auto classes.

A finished run writes `<run>/model/` (and `archifactory export` writes it for any checkpoint):

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

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from archifactory.config.hybrid import layer_mixin_configs, pattern_entries
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.files import share_as_umask_allows
from archifactory.core.hashing import file_digest
from archifactory.data.tokenizer import Tokenizer, transformers_tokenizer
from archifactory.hf.config import ArchiFactoryConfig, register_auto_config
from archifactory.model.folder import PREFIX, WEIGHTS, check_weights, read_folder_config
from archifactory.model.stack import DecodeState, StackedMixinForCausalLM, residual_config


def config_from_run(cfg: DictConfig, vocab_size: int) -> ArchiFactoryConfig:
    """The HF config of a run's composed (resolved) Hydra config."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["vocab_size"] = model.get("vocab_size") or vocab_size
    if pattern_entries(cfg) is not None:  # a hybrid: every layer's mixin in full, independent of the YAMLs
        model["layer_pattern"] = [
            OmegaConf.to_container(layer, resolve=True) for layer in layer_mixin_configs(cfg)
        ]
        model["attention_every"] = 0
    parts = {kind: OmegaConf.to_container(cfg[kind], resolve=True) for kind in ("mixin", "ffn", "positional")}
    parts["residual"] = OmegaConf.to_container(residual_config(cfg), resolve=True)
    return ArchiFactoryConfig(
        model=model,
        **parts,
        hidden_size=model["hidden_size"],
        num_hidden_layers=model["num_layers"],
        vocab_size=model["vocab_size"],
        max_position_embeddings=model["max_seq_len"],
    )


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


def save_pretrained(
    model: StackedMixinForCausalLM, config: ArchiFactoryConfig, tokenizer: Tokenizer, out: str | Path
) -> Path:
    """Write the `model/` folder atomically (a temporary folder renamed into place); returns its path."""

    def write(tmp: Path) -> None:
        weights = {
            PREFIX + n: t.detach().to("cpu", torch.float32).contiguous()
            for n, t in model.state_dict().items()
        }
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config.weights_sha256 = file_digest(tmp / WEIGHTS)
        config.architectures = [ArchiFactoryForCausalLM.__name__]
        config.save_pretrained(tmp)
        write_tokenizer_files(tmp, tokenizer)

    return write_folder_atomically(out, write)


def write_tokenizer_files(folder: Path, tokenizer: Tokenizer) -> None:
    """What every exported folder carries besides the model: generation_config.json (EOS, which doubles as
    BOS and PAD) and the run's tokenizer as a PreTrainedTokenizerFast."""
    eos = tokenizer.eos_id
    GenerationConfig(eos_token_id=eos, bos_token_id=eos, pad_token_id=eos).save_pretrained(folder)
    transformers_tokenizer(tokenizer).save_pretrained(folder)


def write_folder_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """`write` fills a temporary folder next to `out`, which is then renamed into place (replacing an older
    `out`): a failure part-way leaves no half-written folder behind. Returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        write(tmp)
        share_as_umask_allows(tmp)  # mkdtemp's 0700 and safetensors' 0600 would lock others out
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""Writing a Hugging Face format folder (`hf/model.py` describes it): the `model/` folder every finished
training run writes, and the tokenizer and generation files every exported folder carries.

Kept apart from `hf/model.py`: writing needs transformers' configuration, generation-config and tokenizer
code (~1 s of imports), not its modeling code (`PreTrainedModel`: ~3 s more), which only loading a folder
as `ArchiFactoryForCausalLM` uses. Every `train`, `sft` and `grpo` process writes a folder at its end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import GenerationConfig

from archifactory.config.hybrid import layer_mixin_configs, pattern_entries
from archifactory.core.files import share_as_umask_allows
from archifactory.core.hashing import file_digest
from archifactory.data.tokenizer import Tokenizer, transformers_tokenizer
from archifactory.hf.config import ARCHITECTURE, ArchiFactoryConfig
from archifactory.model.folder import PREFIX, WEIGHTS
from archifactory.model.stack import StackedMixinForCausalLM, residual_config


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
        config.architectures = [ARCHITECTURE]
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

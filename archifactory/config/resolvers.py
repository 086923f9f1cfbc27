"""OmegaConf resolvers the configs use. Registered on `import archifactory`, so a saved run config that
still holds its interpolations resolves wherever it is loaded (training, eval, export, report)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import OmegaConf

# The dataset options that change which tokens a run reads (text, Hub, probe and chat datasets alike):
# where the data is, which part of it, how it is decoded, split, capped and tokenized. Where and how the
# cache is kept (cache_dir, verify_cache, rebuild, shard_tokens, streaming, token_env) is not identity,
# nor is document_mask (how the tokens are mixed, not which), nor a chat dataset's tokenizer_from (the
# pretrained run, already named by the sft run name). A key left unset (None) is left out, so
# an option added later with a None default keeps every existing run's name.
DATASET_IDENTITY = (
    "name",
    "source",
    "path",
    "hf_config",
    "revision",
    "train_split",
    "val_split",
    "split",
    "format",
    "text_field",
    "doc_separator",
    "encoding",
    "decode_errors",
    "max_documents",
    "max_tokens",
    "max_conversations",
    "val_fraction",
    "tokenizer",
    "vocab_size",
    "tokenizer_train_chars",
    "task",
    "train_examples",
    "val_examples",
    "num_kv_pairs",
    "power_a",
    "random_non_queries",
    "noise_vocab_size",
    "frac_noise",
    "k_motif_size",
    "v_motif_size",
    "num_tokens_to_copy",
)


def _variant(
    mixin: str,
    layer_pattern: Any,
    attention_every: int,
    attention_mixin: str,
    residual: str = "standard",
    value_residual: bool = False,
    weights: str = "standard",
) -> str:
    from archifactory.config.hybrid import run_name_label  # lazy: keeps `import archifactory` light

    return run_name_label(
        mixin, layer_pattern, attention_every, attention_mixin, residual, value_residual, weights
    )


def dataset_digest(dataset: Any) -> str:
    """6 hex characters of a sha256 over the dataset's identity (`DATASET_IDENTITY`): the same data and
    options give the same digest on every machine and in every process; another `dataset.path`, subset or
    tokenizer gives another, so two corpora never share a run directory by default."""
    identity = {}
    for key in DATASET_IDENTITY:
        value = dataset.get(key) if hasattr(dataset, "get") else None
        if value is not None:
            identity[key] = str(value)  # typed choices and numbers alike, as their plain text
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]


def register_resolvers() -> None:
    """`${variant:mixin,layer_pattern,attention_every,attention_mixin[,residual[,value_residual[,weights]]]}`:
    the variant part of a run name (a run config saved before the residual group passes four arguments,
    one saved before model.value_residual five, one saved before model.weights six);
    `${dataset_digest:${dataset}}`: the short digest of the dataset identity that follows its name."""
    if not OmegaConf.has_resolver("variant"):
        OmegaConf.register_new_resolver("variant", _variant)
    if not OmegaConf.has_resolver("dataset_digest"):
        OmegaConf.register_new_resolver("dataset_digest", dataset_digest)

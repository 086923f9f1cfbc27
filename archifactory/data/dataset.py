"""`load_data` (what the training loop calls) and `prepare_task` (the `data prepare` verb)."""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from archifactory.config.schema import DatasetConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.dataset import ChatData
from archifactory.data.loader import Batch, PackedLoader, val_batches
from archifactory.data.prepare import Prepared, prepare
from archifactory.data.shards import TokenStream
from archifactory.data.synthetic import SyntheticData
from archifactory.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/archifactory"


def as_dataset_config(cfg: Any) -> DatasetConfig:
    """A resolved `DatasetConfig` from a composed `cfg.dataset` node (or a DatasetConfig itself)."""
    if isinstance(cfg, DatasetConfig):
        values = {f.name: getattr(cfg, f.name) for f in fields(DatasetConfig)}
    else:
        try:
            values = (
                OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
                if isinstance(cfg, DictConfig)
                else dict(cfg)
            )
        except MissingMandatoryValue as error:
            raise ArchiFactoryError(
                f"dataset.{error.full_key.split('.')[-1]} is required (set it on the command line)"
            ) from error
    if isinstance(values.get("cache_dir"), str) and values["cache_dir"].startswith("${"):
        # a DatasetConfig built in Python keeps the YAML interpolation text; resolve it the same way
        values["cache_dir"] = os.environ.get("ARCHIFACTORY_CACHE", DEFAULT_CACHE)
    if values.get("name") is None or isinstance(values.get("name"), str) and values["name"] == "???":
        values["name"] = values.get("source") or "data"
    return DatasetConfig(**values)


class TokenData:
    """A prepared dataset: its tokenizer, counts, the training loader and the validation batches."""

    def __init__(
        self, prepared: Prepared, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.tokenizer = prepared.tokenizer
        self.vocab_size: int = self.tokenizer.vocab_size
        self.eos_id: int = self.tokenizer.eos_id
        self.tokenizer_path: str = str(self.tokenizer.path)
        self.cache_dir: Path = prepared.folder
        self.manifest: dict[str, Any] = {**prepared.manifest, "cache_dir": str(prepared.folder)}
        self.reused_cache: bool = prepared.reused
        self.description = (
            "reused token cache, no tokenization" if prepared.reused else "prepared token cache"
        )
        self.marks_answers = False  # every position is a target: no answer accuracy, bits per byte instead
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        dtype = np.dtype(self.manifest["dtype"])
        splits = self.manifest["splits"]
        self.train_stream = TokenStream(prepared.folder, splits["train"]["shards"], dtype)
        self.val_stream = TokenStream(prepared.folder, splits["val"]["shards"], dtype)
        # Validation loss is averaged over every validation token (EOS included); bits per byte divides
        # the same total by the UTF-8 bytes of the validation text: bpb = loss / ln 2 / bytes_per_token.
        self.val_bytes_per_token: float = splits["val"]["bytes"] / max(splits["val"]["tokens"], 1)

    def train_loader(self, batch_size: int, pin_memory: bool = False) -> PackedLoader:
        return PackedLoader(
            self.train_stream, self.seq_len, batch_size, self.seed, self.rank, self.world_size, pin_memory
        )

    def val_batches(self, batch_size: int, max_tokens: int) -> list[Batch]:
        """The same batches on every rank and every call: the first `max_tokens` of the validation split."""
        return val_batches(self.val_stream, self.seq_len, batch_size, max_tokens)


def load_data(
    cfg: Any,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    base_tokenizer: Tokenizer | None = None,
) -> TokenData | SyntheticData | ChatData:
    """Prepare (or reuse) the token cache for `cfg` (the `dataset` config node) and open it; a synthetic
    probe (`source: synthetic`) is generated instead, and chat conversations (`source: chat`, SFT) are
    rendered with the chat template on `base_tokenizer` (the pretrained run's), with the same interface."""
    source = getattr(cfg, "source", None)  # a DictConfig node or a DatasetConfig (tests, scripts)
    if source == "synthetic":
        return SyntheticData(cfg, seq_len, seed, rank, world_size)
    if source == "chat":
        if base_tokenizer is None:
            raise ArchiFactoryError(
                f"dataset {cfg.name} is chat data: it needs the pretrained run's tokenizer (archifactory sft)"
            )
        return ChatData(cfg, base_tokenizer, seq_len, seed, rank, world_size)
    return TokenData(prepare(as_dataset_config(cfg)), seq_len, seed, rank, world_size)


def summary_lines(prepared: Prepared) -> list[str]:
    manifest = prepared.manifest
    tok = manifest["tokenizer"]
    lines = [
        f"dataset   {manifest['name']}: {manifest['source']}"
        + (f" @ {manifest['revision']}" if manifest.get("revision") else ""),
        f"tokenizer {tok['name']} ({tok['kind']}, vocab {tok['vocab_size']:,}, eos {tok['eos_id']}, "
        f"hash {tok['hash']}): {tok['path']}",
    ]  # fmt: skip
    for split in ("train", "val"):
        info = manifest["splits"][split]
        lines.append(
            f"{split:<9} {info['documents']:,} documents, {info['tokens']:,} tokens, {info['bytes']:,} bytes "
            f"({info['bytes'] / max(info['tokens'], 1):.2f} bytes/token), {len(info['shards'])} shard(s)"
        )
    state = "reused (no tokenization)" if prepared.reused else f"written in {manifest['seconds']}s"
    lines.append(f"cache     {prepared.folder} [{manifest['dtype']}] {state}")
    return lines


def prepare_task(cfg: DictConfig) -> None:
    """`archifactory data prepare dataset=…`: build (or check) the token cache and print a summary."""
    if cfg.dataset.get("source") == "synthetic":
        print(f"dataset {cfg.dataset.name}: synthetic, generated during training; nothing to prepare")
        return
    prepared = prepare(as_dataset_config(cfg.dataset))
    print("\n".join(summary_lines(prepared)))

"""Preparation: documents → token ids (+ EOS after each document) → shards + manifest, cached by content.

The cache folder's name is a hash of everything the tokens depend on (the data fingerprint, the
tokenizer's hash and the settings), so a changed file, tokenizer or setting lands in a new folder and an
unchanged one is reused with no tokenization. A folder is built under a temporary name and renamed into
place only when complete (an interrupted prepare leaves only `.tmp-*` folders, which nothing trusts), and
a file lock makes concurrent runs (ranks, a sweep) wait for one preparer instead of racing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from archifactory.config.schema import DatasetConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.files import share_as_umask_allows
from archifactory.data import hub
from archifactory.data.shards import ShardWriter, token_dtype, verify_shards
from archifactory.data.sources import Source, make_source
from archifactory.data.tokenizer import Tokenizer, fetch_hub_tokenizer, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the shard layout or the document handling changes: old caches are then ignored
BATCH_CHARS = 4 << 20  # characters handed to one multi-threaded encode call
BATCH_DOCS = 4096


@dataclass
class Prepared:
    folder: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    reused: bool


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "data"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: a second process preparing the same cache waits, then reuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(target: Path) -> None:
    """Delete the `.tmp-<target>-*` folders a killed preparer left (call with `target`'s lock held: the
    lock holder is the only process that builds `target`, so any such folder is an orphan)."""
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        log.info("removing %s, left by an interrupted preparation", stale)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".tmp-trash-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def document_settings(cfg: DatasetConfig, source: Source) -> dict[str, Any]:
    """What decides which documents land in which split (the tokenizer's and the tokens' common part)."""
    return {
        "format": FORMAT,
        "source": source.fingerprint,
        "text_field": cfg.text_field,
        "doc_separator": cfg.doc_separator,
        "max_documents": cfg.max_documents,
        "val_fraction": None if source.has_val_split else cfg.val_fraction,
    }


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """A lone document's head (training) and tail (validation, ~`fraction` of it), cut at a line break."""
    cut = int(len(text) * (1 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def held_out(documents: Iterable[str], fraction: float) -> Iterator[tuple[str, str]]:
    """Route every k-th document (k = round(1/fraction), starting with the first) to validation.

    Works on a stream of unknown length. A corpus of one document is cut in two instead.
    """
    if not 0 < fraction <= 0.5:
        raise ArchiFactoryError(f"dataset.val_fraction={fraction} must be in (0, 0.5]")
    every = max(2, round(1 / fraction))
    docs = iter(documents)
    first = list(islice(docs, 2))
    if len(first) == 1:
        head, tail = split_text(first[0], fraction)
        yield "train", head
        yield "val", tail
        return
    for index, text in enumerate(_chain(first, docs)):
        yield ("val" if index % every == 0 else "train"), text


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def routed_parts(source: Source, cfg: DatasetConfig) -> list[Iterator[tuple[str, str]]]:
    """The (split, document) streams to tokenize; empty documents are dropped first."""

    def non_empty(split: str) -> Iterator[str]:
        return (text for text in source.documents(split) if text.strip())

    if source.has_val_split:
        return [(("train", t) for t in non_empty("train")), (("val", t) for t in non_empty("val"))]
    return [held_out(non_empty("train"), cfg.val_fraction)]


def training_texts(source: Source, cfg: DatasetConfig, counter: dict[str, int]) -> Iterator[str]:
    """The training documents the BPE learns from: within max_documents and tokenizer_train_chars."""
    budget = cfg.tokenizer_train_chars
    for split, text in routed_parts(source, cfg)[0]:
        if split != "train":
            continue
        if cfg.max_documents is not None and counter["documents"] >= cfg.max_documents:
            return
        if budget is not None and counter["chars"] >= budget:
            return
        counter["documents"] += 1
        counter["chars"] += len(text)
        yield text


def tokenizer_folder(cfg: DatasetConfig, source: Source, root: Path) -> Path:
    """Where the tokenizer for these settings is cached (keyed by what determines it)."""
    if cfg.tokenizer == "bpe":
        key = short_hash([document_settings(cfg, source), cfg.vocab_size, cfg.tokenizer_train_chars])
        return root / "tokenizers" / f"bpe{cfg.vocab_size}-{key}"
    return root / "tokenizers" / f"hub-{slug(cfg.tokenizer)}-{short_hash(cfg.tokenizer)}"


def get_tokenizer(cfg: DatasetConfig, source: Source, root: Path) -> Tokenizer:
    """The cached tokenizer for these settings, trained (bpe) or downloaded (Hub name) on first use."""
    target = tokenizer_folder(cfg, source, root)
    with file_lock(target.parent / f"{target.name}.lock"):
        remove_stale_temporaries(target)
        if (target / "tokenizer.json").is_file():
            log.info("reusing tokenizer %s", target)
            return load_tokenizer(target)
        if cfg.tokenizer != "bpe":
            if not Path(cfg.tokenizer).is_dir():  # a local transformers folder needs no Hub
                hub.check_hub(f"tokenizer {cfg.tokenizer!r}")
            return fetch_hub_tokenizer(cfg.tokenizer, hub.hub_token(cfg.token_env), target)
        source.preflight()
        counter = {"documents": 0, "chars": 0}
        start = time.perf_counter()
        texts = training_texts(source, cfg, counter)
        first = next(texts, None)
        if first is None:
            raise ArchiFactoryError(
                f"the corpus is empty: {source.description} has no non-empty training documents"
            )
        log.info(
            "training a byte-level BPE (vocab %d) on the training split of %s",
            cfg.vocab_size,
            source.description,
        )
        tokenizer = train_bpe(_chain([first], texts), cfg.vocab_size, target)
        log.info("trained BPE on %d documents (%d chars) in %.1fs: %s",
                 counter["documents"], counter["chars"], time.perf_counter() - start, target)  # fmt: skip
        return tokenizer


def _batches(part: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for item in part:
        batch.append(item)
        chars += len(item[1])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_to_shards(folder: Path, cfg: DatasetConfig, source: Source, tok: Tokenizer) -> dict[str, Any]:
    """Encode every document (all cores), append EOS, stream into shards; return per-split counts."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    nbytes = {"train": 0, "val": 0}
    bar = tqdm(total=source.size_bytes, unit="B", unit_scale=True, desc=f"tokenize {cfg.name}", disable=None)
    for part in routed_parts(source, cfg):
        stop = False
        for batch in _batches(part):
            encoded = tok.encode_batch([text for _, text in batch])
            flat: dict[str, list[int]] = {"train": [], "val": []}
            for (split, text), ids in zip(batch, encoded):
                ids.append(tok.eos_id)
                if split == "train":
                    if cfg.max_documents is not None and docs["train"] >= cfg.max_documents:
                        stop = True
                        break
                    if cfg.max_tokens is not None:
                        room = cfg.max_tokens - writers["train"].tokens - len(flat["train"])
                        stop = room <= len(ids)
                        ids = ids[: max(room, 0)]
                flat[split].extend(ids)
                docs[split] += 1
                size = len(text.encode("utf-8"))
                nbytes[split] += size
                bar.update(size)
                if stop:
                    break
            for split, ids in flat.items():
                writers[split].write(np.array(ids, dtype=dtype))
            bar.set_postfix(train_tokens=f"{writers['train'].tokens:,}", shards=len(writers["train"].shards))
            if stop:
                break
    bar.close()
    splits = {
        split: {
            "documents": docs[split],
            "tokens": writers[split].tokens,
            "bytes": nbytes[split],
            "shards": writers[split].close(),
        }  # fmt: skip
        for split in ("train", "val")
    }
    if docs["train"] == 0:
        raise ArchiFactoryError(
            f"the corpus is empty: {source.description} has no non-empty training documents"
        )
    if docs["val"] == 0:
        raise ArchiFactoryError(
            f"{source.description} gave no validation documents; raise dataset.val_fraction"
        )
    return splits


def check_cache(folder: Path, key: str, tok: Tokenizer, checksums: bool) -> dict[str, Any]:
    """The manifest of an existing cache folder, or a one-line error saying how it is broken."""
    fix = f"delete {folder} (or pass dataset.rebuild=true) to tokenize again"
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise ArchiFactoryError(f"token cache {folder} has no readable manifest ({error}); {fix}") from error
    try:
        if (
            manifest["format"] != FORMAT
            or manifest["key"] != key
            or manifest["tokenizer"]["hash"] != tok.hash
        ):
            raise ArchiFactoryError(
                f"token cache {folder} does not match its settings (key or tokenizer); {fix}"
            )
        dtype = np.dtype(manifest["dtype"])
        problems = [
            verify_shards(folder, manifest["splits"][s]["shards"], dtype, checksums) for s in ("train", "val")
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise ArchiFactoryError(f"token cache {folder} has a corrupt manifest ({error!r}); {fix}") from error
    problem = next((p for p in problems if p), None)
    if problem:
        raise ArchiFactoryError(f"token cache {folder} is corrupt: {problem}; {fix}")
    return manifest


def cache_root(cfg: DatasetConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def prepare(cfg: DatasetConfig) -> Prepared:
    """Find or build the token cache for `cfg`."""
    root = cache_root(cfg)
    source = make_source(cfg)
    tok = get_tokenizer(cfg, source, root)
    settings = {**document_settings(cfg, source), "max_tokens": cfg.max_tokens, "tokenizer": tok.hash}
    key = short_hash(settings)
    folder = root / "tokens" / f"{slug(cfg.name)}-{key}"
    with file_lock(folder.parent / f"{folder.name}.lock"):
        remove_stale_temporaries(folder)
        if folder.exists() and cfg.rebuild:
            log.info("dataset.rebuild=true: removing %s", folder)
            trash = folder.with_name(f".tmp-trash-{folder.name}-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash)
        if folder.exists():
            manifest = check_cache(folder, key, tok, cfg.verify_cache)
            log.info("reusing token cache %s (no tokenization)", folder)
            return Prepared(folder, manifest, tok, reused=True)
        source.preflight()
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
        try:
            splits = tokenize_to_shards(tmp, cfg, source, tok)
            manifest = {
                "format": FORMAT,
                "key": key,
                "name": cfg.name,
                "source": source.description,
                "fingerprint": source.fingerprint,
                "revision": source.revision(),
                "settings": settings,
                "tokenizer": {
                    "kind": tok.kind,
                    "name": tok.name,
                    "hash": tok.hash,
                    "path": str(tok.path),
                    "vocab_size": tok.vocab_size,
                    "eos_id": tok.eos_id,
                },  # fmt: skip
                "dtype": token_dtype(tok.vocab_size).name,
                "splits": splits,
                "seconds": round(time.perf_counter() - start, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            share_as_umask_allows(tmp)  # mkdtemp makes it 0700: a shared cache is for every user
            os.rename(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("prepared token cache %s in %.1fs", folder, manifest["seconds"])
        return Prepared(folder, manifest, tok, reused=False)

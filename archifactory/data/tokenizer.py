"""Tokenizers: a byte-level BPE trained on the training split, or any Hub tokenizer by name.

Both end up as a `tokenizers.Tokenizer` (the Rust library, multi-threaded batch encoding) wrapped in
`Tokenizer`, saved as `tokenizer.json` + `meta.json` in a cache folder that `load_tokenizer` reads back
(so `generate`/`eval` use exactly the tokenizer the model was trained with). The folder is keyed by what
determines the tokenizer, so every variant of an ablation on the same data shares one tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.files import share_as_umask_allows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Long documents are encoded in pieces of about this many characters, so one huge file still spreads
# over all cores and never builds a giant Encoding. Cut points are chosen so the ids do not change.
CHUNK_CHARS = 1 << 16


class Tokenizer:
    """`encode(str) -> list[int]`, `decode(list[int]) -> str`, `encode_batch`, `eos_id`, `vocab_size`."""

    def __init__(self, backend, eos_id: int, kind: str, name: str, path: Path) -> None:
        self.backend = backend
        self.eos_id = eos_id
        self.kind = kind  # "bpe" (ours) or "hub"
        self.name = name
        self.path = path
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.hash = hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents at once on all cores (Rust threads); no special tokens added."""
        if self.kind != "bpe":
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        pieces: list[str] = []
        owner: list[int] = []
        for index, text in enumerate(texts):
            for piece in split_for_encoding(text):
                pieces.append(piece)
                owner.append(index)
        encoded = self.backend.encode_batch_fast(pieces, add_special_tokens=False)
        out: list[list[int]] = [[] for _ in texts]
        for index, enc in zip(owner, encoded):
            out[index].extend(enc.ids)
        return out


def split_for_encoding(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut `text` into ~`size`-char pieces whose byte-level BPE encodings concatenate to the whole's.

    A cut is made right after a newline that sits between two non-space characters ("…x\\ny…"): the
    GPT-2 pre-tokenizer then makes "\\n" its own piece whether or not the text is cut there, and BPE
    never merges across pre-tokenizer pieces.
    """
    start = 0
    while len(text) - start > size:
        cut = -1
        search_from = start + size
        while cut < 0:
            newline = text.find("\n", search_from)
            if newline < 0 or newline + 1 >= len(text):
                break
            before, after = text[newline - 1], text[newline + 1]
            if not before.isspace() and not after.isspace():
                cut = newline + 1
            else:
                search_from = newline + 1
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _save(backend, eos_id: int, kind: str, name: str, target: Path) -> None:
    """Write tokenizer.json + meta.json to a temp folder, then rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    backend.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps({"kind": kind, "name": name, "eos_id": eos_id}, indent=2))
    share_as_umask_allows(tmp)  # mkdtemp makes it 0700
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same tokenizer first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer folder written by ArchiFactory (`data.tokenizer_path`)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    if not (path / "tokenizer.json").is_file() or not (path / "meta.json").is_file():
        raise ArchiFactoryError(
            f"{path} is not an ArchiFactory tokenizer folder (needs tokenizer.json and meta.json)"
        )
    meta = json.loads((path / "meta.json").read_text())
    return Tokenizer(
        Backend.from_file(str(path / "tokenizer.json")), meta["eos_id"], meta["kind"], meta["name"], path
    )


def train_bpe(texts: Iterable[str], vocab_size: int, target: Path) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (every byte representable, so no unknown tokens); EOS is id 0."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ArchiFactoryError(
            f"dataset.vocab_size={vocab_size} is too small for byte-level BPE; use >= 257"
        )
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=log.isEnabledFor(logging.INFO),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    _save(backend, backend.token_to_id(EOS_TOKEN), "bpe", f"bpe{vocab_size}", target)
    return load_tokenizer(target)


def fetch_hub_tokenizer(name: str, token: str | None, target: Path) -> Tokenizer:
    """Download a Hub tokenizer (transformers AutoTokenizer) once and keep its fast backend."""
    from archifactory.data.hub import hub_errors

    with hub_errors(f"tokenizer {name!r}", gated_hint=True):
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(name, token=token)
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ArchiFactoryError(
            f"tokenizer {name!r} has no fast (Rust) version; pick another dataset.tokenizer or bpe"
        )
    eos_id = hf_tok.eos_token_id
    if eos_id is None:
        raise ArchiFactoryError(
            f"tokenizer {name!r} defines no EOS token; pick another dataset.tokenizer or bpe"
        )
    _save(backend, int(eos_id), "hub", name, target)
    return load_tokenizer(target)


def transformers_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap the run's `tokenizers.Tokenizer` for transformers: same ids; EOS doubles as BOS/PAD."""
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token=eos, bos_token=eos, pad_token=eos, unk_token=None
    )

"""Document sources: local files (`dataset=text`) and Hugging Face Hub datasets (tinystories, pints, hf).

A source yields documents (strings) per split and a *fingerprint*: a JSON-able description of its
content that needs no network, so a prepared token cache is found again offline. Local files are
fingerprinted by their bytes (edit a file → new cache); a Hub dataset by its id, config, revision and
splits (pin `dataset.revision` to tie a cache to one commit).

Local files: `.txt` — one document per file, or split on `dataset.doc_separator` (e.g. "\\n\\n" or
"<|endoftext|>"); `.jsonl` — one document per line, the `dataset.text_field` of each JSON object;
`.parquet` — the `dataset.text_field` column. `dataset.path` is a file, a folder (searched recursively,
files in sorted order) or a glob.

Decoding is strict: `.txt` and `.jsonl` files are read as `dataset.encoding` (UTF-8 by default; a leading
UTF-8 byte-order mark is dropped), and the first undecodable byte stops preparation with one line naming
the file and its byte offset. `dataset.decode_errors=replace` opts in to U+FFFD replacement instead (the
log then says how many characters of which file were replaced). A file that decodes to text full of NUL
or other control characters is refused as binary, whatever the encoding; text with a few stray control
characters (backspace, BEL, ESC: C0 other than tab, newline, carriage return and form feed) is kept and
reported in one warning line (how many, and where the first is). A one-file `.txt` corpus that stays one
document (no `dataset.doc_separator`, or one not found in it) is warned about too.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archifactory.config.schema import DatasetConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub
from archifactory.data.shards import file_digest

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
BINARY_SAMPLE = 1 << 16  # characters looked at to tell text from binary
BINARY_CONTROL_SHARE = 0.01  # more control characters than this (or any NUL) = a binary file
TEXT_CONTROLS = set("\t\n\r\f\v\x1b")  # control characters that real text files contain
STRAY_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f]")  # C0 but tab, newline, carriage return, form feed


class ControlCharacters:
    """Counts stray control characters over a pass through the documents; one warning line at its end."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None
        self.warned = False

    def note(self, text: str, where: str) -> None:
        found = STRAY_CONTROL.findall(text)
        if found and self.first is None:
            offset = STRAY_CONTROL.search(text).start()  # type: ignore[union-attr]
            self.first = f"{where}, character {offset} ({found[0]!r})"
        self.count += len(found)

    def warn_once(self) -> None:
        if self.count and not self.warned:
            self.warned = True
            log.warning(
                "the text holds %d control character(s) (backspace, BEL, ESC, …), the first in %s; "
                "they are kept and tokenized: clean the corpus if they are not meant to be there",
                self.count,
                self.first,
            )


def looks_binary(text: str) -> bool:
    """True when a decoded sample holds a NUL or more than 1% control characters (tabs, newlines excepted)."""
    sample = text[:BINARY_SAMPLE]
    if "\x00" in sample:
        return True
    # C0 controls and DEL only: C1 (U+0080-U+009F) also stands for cp1252's quotes read as latin-1
    controls = sum(1 for ch in sample if (ch < " " or ch == "\x7f") and ch not in TEXT_CONTROLS)
    return controls > BINARY_CONTROL_SHARE * max(len(sample), 1)


class Decoder:
    """Bytes of one file -> text, strictly (or replacing, when asked), with errors that name the file and
    the byte offset."""

    def __init__(self, encoding: str, errors: str) -> None:
        self.encoding = codecs.lookup(encoding).name
        self.errors = str(errors)
        # Python's "utf-8" codec keeps a byte-order mark as U+FEFF; utf-8-sig drops it and is otherwise equal
        self.codec = "utf-8-sig" if self.encoding == "utf-8" else self.encoding
        # a file can be split into lines on b"\n" before decoding (utf-16/32 cannot)
        self.line_safe = codecs.lookup(self.encoding).encode("\n")[0] == b"\n"

    def decode(self, data: bytes, path: Path, offset: int = 0, line: int | None = None) -> str:
        where = f"{path}:{line}" if line is not None else str(path)
        try:
            text = data.decode(self.codec, errors="strict")
        except UnicodeDecodeError as error:
            if self.line_safe and looks_binary(data[:BINARY_SAMPLE].decode("latin-1")):
                self.check_text(data[:BINARY_SAMPLE].decode("latin-1"), path)
            if self.errors != "replace":
                raise ArchiFactoryError(
                    f"{where}: byte {offset + error.start} (0x{data[error.start]:02x}) is not valid "
                    f"{self.encoding} ({error.reason}); set dataset.encoding=<codec> (e.g. latin-1, cp1252) "
                    "or dataset.decode_errors=replace"
                ) from None
            text = data.decode(self.codec, errors="replace")
            replaced = text.count("\ufffd") - data.decode(self.codec, errors="ignore").count("\ufffd")
            log.warning("%s: replaced %d undecodable character(s) with U+FFFD", where, replaced)
        return text

    def check_text(self, text: str, path: Path) -> None:
        if looks_binary(text):
            raise ArchiFactoryError(
                f"{path} looks binary (NUL or control bytes where text has none); "
                "remove it from dataset.path or point dataset.path at text files"
            )


class Source:
    """Documents of a dataset, split by split."""

    description: str
    fingerprint: dict[str, Any]
    has_val_split: bool  # False: the preparer holds out a share of the training documents
    size_bytes: int | None = None  # for the progress bar, when known

    def documents(self, split: str) -> Iterator[str]:  # split: "train" or "val"
        raise NotImplementedError

    def preflight(self) -> None:
        """Fail now, with one line, if reading the documents is bound to fail (no Hub, no token)."""

    def revision(self) -> str | None:
        return None


def resolve_files(pattern: str) -> list[Path]:
    """The supported files a `dataset.path` names: a file, a folder (recursive) or a glob, sorted."""
    expanded = str(Path(pattern).expanduser())
    path = Path(expanded)
    if any(ch in expanded for ch in "*?["):
        found = [Path(p) for p in glob.glob(expanded, recursive=True)]
        files = sorted(p for p in found if p.is_file() and p.suffix in SUFFIXES)
        where = f"the glob {pattern!r}"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        where = f"the folder {pattern}"
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise ArchiFactoryError(
                f"dataset.path={pattern}: unsupported file type; use {', '.join(SUFFIXES)}"
            )
        files, where = [path], ""
    else:
        raise ArchiFactoryError(
            f"dataset.path={pattern} does not exist; point it at a file, a folder or a glob"
        )
    if not files:
        raise ArchiFactoryError(
            f"no {'/'.join(SUFFIXES)} files in {where}; point dataset.path at your corpus"
        )
    return files


def check_dataset_path(cfg: Any) -> None:
    """Refuse a local dataset (`dataset.source=text`, or local chat files: `dataset.format=chat_jsonl`) whose
    `dataset.path` names no file, in one line, before anything is matched, built or claimed: a typo reads
    "does not exist", never as a clash with another run. An RL dataset (prompts with answers, `archifactory
    grpo`) is refused here too: it holds no text to train on."""
    if cfg.get("source") == "rl":
        raise ArchiFactoryError(
            f"dataset={cfg.get('name')} is prompts with answers for `archifactory grpo`; "
            "train takes text or Hub data (dataset=text|tinystories|…) and sft chat data"
        )
    if cfg.get("source") == "chat" and cfg.get("format") == "chat_jsonl" and cfg.get("path"):
        resolve_files(str(cfg.path))  # (the Hub chat formats take `path` as a dataset id)
        return
    if cfg.get("source") != "text":
        return
    if not cfg.get("path"):
        raise ArchiFactoryError("dataset=text needs dataset.path=<file|folder|glob>")
    resolve_files(str(cfg.path))


class LocalText(Source):
    """`.txt` / `.jsonl` / `.parquet` files on disk."""

    has_val_split = False

    def __init__(self, cfg: DatasetConfig) -> None:
        if not cfg.path:
            raise ArchiFactoryError("dataset=text needs dataset.path=<file|folder|glob>")
        self.files = resolve_files(cfg.path)
        self.text_field = cfg.text_field
        self.decoder = Decoder(cfg.encoding, cfg.decode_errors)
        # a separator typed on the command line arrives with literal backslash escapes ("\\n\\n")
        self.separator = (
            cfg.doc_separator.replace("\\n", "\n").replace("\\t", "\t") if cfg.doc_separator else None
        )
        self.description = f"local files {cfg.path} ({len(self.files)} files)"
        self.controls = ControlCharacters()
        self.one_document_warned = False
        self.size_bytes = sum(f.stat().st_size for f in self.files)
        root = Path(cfg.path).expanduser()
        base = root if root.is_dir() else None
        self.fingerprint = {
            "kind": "text",
            "files": [[str(f.relative_to(base)) if base else f.name, file_digest(f)] for f in self.files],
            # the same bytes decoded another way are other documents: another tokenizer and token cache
            "decoding": [self.decoder.encoding, self.decoder.errors],
        }

    def documents(self, split: str) -> Iterator[str]:
        if not self.controls.warned:  # a pass cut short (the BPE's character budget) counts afresh
            self.controls = ControlCharacters()
        for path in self.files:
            if path.suffix == ".txt":
                text = self.decoder.decode(path.read_bytes(), path)
                self.decoder.check_text(text, path)
                self.controls.note(text, str(path))
                pieces = text.split(self.separator) if self.separator else [text]
                if len(self.files) == 1 and len(pieces) == 1:
                    self._warn_one_document(path)
                yield from pieces
            elif path.suffix == ".jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)
        self.controls.warn_once()

    def _warn_one_document(self, path: Path) -> None:
        """A one-file corpus with no separator found in it: one long document (cut once for validation)."""
        if self.one_document_warned:
            return
        self.one_document_warned = True
        found = (
            f"dataset.doc_separator={self.separator!r} is not in it"
            if self.separator
            else "no dataset.doc_separator"
        )
        log.warning(
            "%s is the whole corpus and one document (%s); set dataset.doc_separator to split it into "
            "documents, e.g. dataset.doc_separator='\\n\\n' or '<|endoftext|>'",
            path,
            found,
        )

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, decoded line) of a file, streamed when the encoding allows it."""
        if not self.decoder.line_safe:
            yield from enumerate(self.decoder.decode(path.read_bytes(), path).splitlines(), 1)
            return
        with path.open("rb") as handle:
            offset = 0
            for number, raw in enumerate(handle, 1):
                yield number, self.decoder.decode(raw, path, offset, number)
                offset += len(raw)

    def _jsonl(self, path: Path) -> Iterator[str]:
        for number, line in self._lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ArchiFactoryError(f"{path}:{number} is not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or self.text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise ArchiFactoryError(
                    f"{path}:{number} has no field {self.text_field!r} (it has: {keys}); "
                    "set dataset.text_field="
                )
            text = str(record[self.text_field] or "")
            self.controls.note(text, f"{path}:{number}")
            yield text

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            raise ArchiFactoryError(
                f"{path} has no column {self.text_field!r} (it has: {', '.join(names)}); "
                "set dataset.text_field="
            )
        row = 0
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                self.controls.note(text or "", f"{path} row {row}")
                row += 1
                yield text or ""


class HubDataset(Source):
    """A Hugging Face Hub dataset through `datasets.load_dataset` (streamed when `dataset.streaming`)."""

    def __init__(self, cfg: DatasetConfig) -> None:
        self.name = cfg.path
        if not self.name or self.name == "hf":
            raise ArchiFactoryError(
                "dataset=hf needs dataset.name=<hub dataset id> (and dataset.text_field=<column>)"
            )
        self.cfg = cfg
        self.has_val_split = cfg.val_split is not None
        self.description = f"hf:{self.name}" + (f"/{cfg.hf_config}" if cfg.hf_config else "")
        self.controls = ControlCharacters()
        self.fingerprint = {
            "kind": "hf",
            "name": self.name,
            "config": cfg.hf_config,
            "revision": cfg.revision,
            "splits": [cfg.train_split, cfg.val_split],
        }

    def _token(self) -> str | None:
        token = hub.hub_token(self.cfg.token_env)
        if self.cfg.gated and not token:
            raise hub.gated_error(f"dataset {self.name!r}", self.cfg.token_env)
        return token

    def preflight(self) -> None:
        self._token()
        hub.check_hub(f"dataset {self.name!r}")

    def documents(self, split: str) -> Iterator[str]:
        cfg = self.cfg
        token = self._token()
        what = f"dataset {self.name!r}"
        hub.check_hub(what)
        split_name = cfg.val_split if split == "val" else cfg.train_split
        with hub.hub_errors(what, env_name=cfg.token_env):
            import datasets

            data = datasets.load_dataset(
                self.name,
                cfg.hf_config,
                split=split_name,
                streaming=cfg.streaming,
                revision=cfg.revision,
                token=token,
            )
        columns = data.column_names
        if columns is None:  # some streamed datasets only know their columns after the first row
            columns = list(next(iter(data)).keys())
        if cfg.text_field not in columns:
            raise ArchiFactoryError(
                f"{what} has no field {cfg.text_field!r} (it has: {', '.join(columns)}); "
                "set dataset.text_field="
            )
        data = data.select_columns([cfg.text_field])
        if not self.controls.warned:  # a pass cut short (the BPE's character budget) counts afresh
            self.controls = ControlCharacters()
        row = 0
        with hub.hub_errors(what, env_name=cfg.token_env):
            for batch in data.iter(batch_size=1024):
                for text in batch[cfg.text_field]:
                    self.controls.note(text or "", f"{self.description} split {split_name} row {row}")
                    row += 1
                    yield text or ""
        self.controls.warn_once()

    def revision(self) -> str | None:
        """The commit the data came from (asked of the Hub once, at preparation)."""
        try:
            from huggingface_hub import HfApi

            return (
                HfApi()
                .dataset_info(self.name, revision=self.cfg.revision, token=self._token(), timeout=10)
                .sha
            )
        except Exception as error:  # the manifest then records the requested revision only
            log.debug("could not resolve the revision of %s: %s", self.name, error)
            return self.cfg.revision


def make_source(cfg: DatasetConfig) -> Source:
    if cfg.source == "text":
        return LocalText(cfg)
    if cfg.source == "hf":
        return HubDataset(cfg)
    raise ArchiFactoryError(f"dataset.source={cfg.source!r} is unknown; use text or hf")

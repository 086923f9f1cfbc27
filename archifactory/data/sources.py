"""Document sources: local files (`dataset=text`) and Hugging Face Hub datasets (tinystories, pints, hf).

A source yields documents (strings) per split and a *fingerprint*: a JSON-able description of its
content that needs no network, so a prepared token cache is found again offline. Local files are
fingerprinted by their bytes (edit a file → new cache); a Hub dataset by its id, config, revision and
splits (pin `dataset.revision` to tie a cache to one commit).

Local files: `.txt` — one document per file, or split on `dataset.doc_separator` (e.g. "\\n\\n" or
"<|endoftext|>"); `.jsonl` — one document per line, the `dataset.text_field` of each JSON object;
`.parquet` — the `dataset.text_field` column. `dataset.path` is a file, a folder (searched recursively,
files in sorted order) or a glob.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from archifactory.config import DatasetConfig
from archifactory.data import hub
from archifactory.data.shards import file_digest
from archifactory.errors import ArchiFactoryError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")


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


class LocalText(Source):
    """`.txt` / `.jsonl` / `.parquet` files on disk."""

    has_val_split = False

    def __init__(self, cfg: DatasetConfig) -> None:
        if not cfg.path:
            raise ArchiFactoryError("dataset=text needs dataset.path=<file|folder|glob>")
        self.files = resolve_files(cfg.path)
        self.text_field = cfg.text_field
        # a separator typed on the command line arrives with literal backslash escapes ("\\n\\n")
        self.separator = (
            cfg.doc_separator.replace("\\n", "\n").replace("\\t", "\t") if cfg.doc_separator else None
        )
        self.description = f"local files {cfg.path} ({len(self.files)} files)"
        self.size_bytes = sum(f.stat().st_size for f in self.files)
        root = Path(cfg.path).expanduser()
        base = root if root.is_dir() else None
        self.fingerprint = {
            "kind": "text",
            "files": [[str(f.relative_to(base)) if base else f.name, file_digest(f)] for f in self.files],
        }

    def documents(self, split: str) -> Iterator[str]:
        for path in self.files:
            if path.suffix == ".txt":
                text = path.read_text(encoding="utf-8", errors="replace")
                yield from text.split(self.separator) if self.separator else [text]
            elif path.suffix == ".jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)

    def _jsonl(self, path: Path) -> Iterator[str]:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
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
                yield str(record[self.text_field] or "")

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            raise ArchiFactoryError(
                f"{path} has no column {self.text_field!r} (it has: {', '.join(names)}); "
                "set dataset.text_field="
            )
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=4096):
            yield from (text or "" for text in batch.column(0).to_pylist())


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
        with hub.hub_errors(what, env_name=cfg.token_env):
            for batch in data.iter(batch_size=1024):
                yield from (text or "" for text in batch[cfg.text_field])

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

"""Local text decodes strictly: undecodable bytes and binary files are refused with the file and the byte
offset; another encoding or U+FFFD replacement are explicit choices (issue #9)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from archifactory.config.schema import DatasetConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.data.prepare import prepare
from archifactory.data.sources import LocalText
from tests.data.conftest import make_text


def docs(cfg: DatasetConfig) -> list[str]:
    return list(LocalText(cfg).documents("train"))


def test_binary_file_is_refused(tmp_path: Path, make_cfg: Callable[..., DatasetConfig]) -> None:
    (tmp_path / "good.txt").write_text(make_text(0))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ArchiFactoryError, match=r"blob.txt looks binary"):
        docs(make_cfg(path=str(tmp_path)))
    # even read as latin-1, where every byte decodes, or with replacement
    for options in ({"encoding": "latin-1"}, {"decode_errors": "replace"}):
        with pytest.raises(ArchiFactoryError, match=r"blob.txt looks binary"):
            docs(make_cfg(path=str(tmp_path), **options))


def test_latin1_file_is_refused_with_its_byte_offset(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig]
) -> None:
    path = tmp_path / "french.txt"
    path.write_bytes("Le caf\u00e9 est na\u00eff.\n".encode("latin-1"))
    with pytest.raises(ArchiFactoryError) as info:
        docs(make_cfg(path=str(path)))
    message = str(info.value)
    assert "french.txt: byte 6 (0xe9) is not valid utf-8" in message
    assert "dataset.encoding=" in message and "dataset.decode_errors=replace" in message


def test_declared_encoding_decodes_exactly(tmp_path: Path, make_cfg: Callable[..., DatasetConfig]) -> None:
    path = tmp_path / "french.txt"
    path.write_bytes("Le caf\u00e9 est na\u00eff.\n".encode("latin-1"))
    assert docs(make_cfg(path=str(path), encoding="latin-1")) == ["Le caf\u00e9 est na\u00eff.\n"]
    utf16 = tmp_path / "u16" / "records.jsonl"
    utf16.parent.mkdir()
    utf16.write_text('{"text": "na\u00efve"}\n{"text": "caf\u00e9"}\n', encoding="utf-16")
    assert docs(make_cfg(path=str(utf16.parent), encoding="utf-16")) == ["na\u00efve", "caf\u00e9"]


def test_replace_is_opt_in_and_counted(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"caf\xe9 and a real \xef\xbf\xbd and na\xefve\n")
    with caplog.at_level(logging.WARNING):
        (text,) = docs(make_cfg(path=str(path), decode_errors="replace"))
    assert text == "caf\ufffd and a real \ufffd and na\ufffdve\n"
    assert "mixed.txt: replaced 2 undecodable character(s)" in caplog.text  # not the genuine U+FFFD


def test_jsonl_error_names_line_and_byte(tmp_path: Path, make_cfg: Callable[..., DatasetConfig]) -> None:
    path = tmp_path / "data.jsonl"
    first = json.dumps({"text": "fine"}) + "\n"
    path.write_bytes(first.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ArchiFactoryError, match=rf"data.jsonl:2: byte {len(first) + 13} \(0xe9\)"):
        docs(make_cfg(path=str(path)))


def test_utf8_byte_order_mark_is_not_text(tmp_path: Path, make_cfg: Callable[..., DatasetConfig]) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert docs(make_cfg(path=str(path))) == ["hello"]


def test_decoding_is_part_of_the_cache_key(tmp_path: Path, make_cfg: Callable[..., DatasetConfig]) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("plain ascii text\n")
    strict = LocalText(make_cfg(path=str(tmp_path / "c")))
    latin = LocalText(make_cfg(path=str(tmp_path / "c"), encoding="latin-1"))
    assert strict.fingerprint != latin.fingerprint


def test_interrupted_prepare_leaves_no_temporary_folder(
    corpus: Path, make_cfg: Callable[..., DatasetConfig]
) -> None:
    cfg = make_cfg(path=str(corpus))
    folder = prepare(cfg).folder
    tokenizer_dir = next((folder.parent.parent / "tokenizers").glob("bpe*"))
    orphans = [
        folder.parent / f".tmp-{folder.name}-killed",
        tokenizer_dir.parent / f".tmp-{tokenizer_dir.name}-killed",
    ]
    for orphan in orphans:  # what a kill -9 mid-preparation leaves
        orphan.mkdir()
        (orphan / "train_00000.bin").write_bytes(b"\0" * 64)
    assert prepare(cfg).reused
    assert not any(orphan.exists() for orphan in orphans)

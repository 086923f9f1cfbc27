"""Corpora that train, but not as the user probably meant, are reported in one warning line each (issue
#30, item 9): a one-file corpus that stays one document, and text holding stray control characters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from archifactory.config.schema import DatasetConfig
from archifactory.data.prepare import prepare
from archifactory.data.sources import LocalText
from tests.data.conftest import make_text


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_control_characters_are_counted_in_one_line_and_kept(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.txt").write_text(make_text(0) + "\tform\ffeed and crlf\r\n")  # text controls: silent
    (tmp_path / "b.txt").write_text("ding\x07 typo\x08\x08 fixed\n" + make_text(1))
    with caplog.at_level(logging.WARNING):
        documents = list(LocalText(make_cfg(path=str(tmp_path))).documents("train"))
    assert "ding\x07 typo\x08\x08 fixed" in documents[1], "kept, not refused"
    (line,) = warnings(caplog)
    assert "3 control character(s)" in line and f"{tmp_path / 'b.txt'}, character 4 ('\\x07')" in line


def test_control_characters_in_jsonl_name_the_line(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "clean"}\n{"text": "bell\\u0007"}\n')
    with caplog.at_level(logging.WARNING):
        list(LocalText(make_cfg(path=str(path))).documents("train"))
    (line,) = warnings(caplog)
    assert f"1 control character(s) (backspace, BEL, ESC, …), the first in {path}:2, character 4" in line


def test_clean_text_warns_nothing(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(make_text(i))
    with caplog.at_level(logging.WARNING):
        list(LocalText(make_cfg(path=str(tmp_path))).documents("train"))
    assert warnings(caplog) == []


def test_one_file_one_document_points_to_doc_separator_once(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "book.txt"
    path.write_text("".join(make_text(i, sentences=60) for i in range(4)))
    with caplog.at_level(logging.WARNING):
        prepare(make_cfg(path=str(path)))  # reads the corpus twice: the BPE, then the tokens
    (line,) = warnings(caplog)
    assert line.startswith(f"{path} is the whole corpus and one document (no dataset.doc_separator)")
    assert "set dataset.doc_separator" in line


def test_a_separator_that_is_not_found_is_named(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "book.txt"
    path.write_text(make_text(0))
    with caplog.at_level(logging.WARNING):
        list(LocalText(make_cfg(path=str(path), doc_separator="<|endoftext|>")).documents("train"))
    (line,) = warnings(caplog)
    assert "dataset.doc_separator='<|endoftext|>' is not in it" in line


def test_split_one_file_or_many_files_warn_nothing(
    tmp_path: Path, make_cfg: Callable[..., DatasetConfig], caplog: pytest.LogCaptureFixture
) -> None:
    book = tmp_path / "book.txt"
    book.write_text(make_text(0) + "<|endoftext|>" + make_text(1))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.txt").write_text(make_text(i))
    with caplog.at_level(logging.WARNING):
        assert (
            len(list(LocalText(make_cfg(path=str(book), doc_separator="<|endoftext|>")).documents("x"))) == 2
        )
        assert len(list(LocalText(make_cfg(path=str(folder))).documents("x"))) == 2
    assert warnings(caplog) == []


def test_control_characters_in_a_hub_dataset_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import datasets

    from archifactory.data.dataset import as_dataset_config
    from archifactory.data.sources import HubDataset
    from tests.helpers import compose_config

    rows = {"train": ["clean", "a bell\x07 rings", "back\x08space"]}
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, config=None, *, split, streaming, revision, token: datasets.Dataset.from_dict(
            {"text": rows[split]}
        ),
    )
    cfg = compose_config(["dataset=hf", "dataset.path=org/set", f"dataset.cache_dir={tmp_path}"]).dataset
    with caplog.at_level(logging.WARNING):
        assert list(HubDataset(as_dataset_config(cfg)).documents("train")) == rows["train"]
    (line,) = warnings(caplog)
    assert "2 control character(s)" in line and "hf:org/set split train row 1, character 6 ('\\x07')" in line

"""Every user error is one clear ArchiFactoryError line; the Hub paths run offline against a stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub, load_data
from tests.helpers import compose_config


def test_text_without_path(tmp_path) -> None:
    cfg = compose_config(["dataset=text", f"dataset.cache_dir={tmp_path}"])
    with pytest.raises(ArchiFactoryError, match=r"dataset=text needs dataset.path=<file\|folder\|glob>"):
        load_data(cfg.dataset, seq_len=8, seed=0)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing_dir", "does not exist"),
        ("corpus/*.nothing", "no .txt/.jsonl/.parquet files"),
        ("notes.md", "unsupported file type"),
    ],
)
def test_bad_local_paths(tmp_path, corpus, make_cfg, path, message) -> None:
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(ArchiFactoryError, match=message):
        load_data(make_cfg(path=str(tmp_path / path)), seq_len=8, seed=0)


def test_empty_corpus(tmp_path, make_cfg) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n\n")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(ArchiFactoryError, match="corpus is empty"):
        load_data(make_cfg(path=str(tmp_path / "empty")), seq_len=8, seed=0)


def test_missing_text_field_in_jsonl_and_parquet(tmp_path, make_cfg) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hi there", "id": 1}) + "\n")
    with pytest.raises(ArchiFactoryError, match=r"no field 'text' \(it has: content, id\)"):
        load_data(make_cfg(path=str(tmp_path / "a.jsonl")), seq_len=8, seed=0)
    pq.write_table(pa.table({"content": ["hi"]}), tmp_path / "b.parquet")
    with pytest.raises(ArchiFactoryError, match=r"no column 'text' \(it has: content\)"):
        load_data(make_cfg(path=str(tmp_path / "b.parquet")), seq_len=8, seed=0)


def test_hub_unreachable_in_offline_mode_names_the_offline_path(tmp_path) -> None:
    # The real `datasets` code path with HF_HUB_OFFLINE=1 (set by tests/conftest.py) and an empty cache.
    cfg = compose_config(["dataset=tinystories", f"dataset.cache_dir={tmp_path}"])
    start = time.perf_counter()
    with pytest.raises(
        ArchiFactoryError, match=r"can't reach the Hugging Face Hub.*dataset=text dataset.path="
    ):
        load_data(cfg.dataset, seq_len=8, seed=0)
    assert time.perf_counter() - start < 30


def test_hub_unreachable_without_network_fails_before_any_retry(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    assert not hub.hub_reachable(timeout=1.0)

    def never(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the Hub is unreachable")

    monkeypatch.setattr("datasets.load_dataset", never)
    cfg = compose_config(["dataset=tinystories", f"dataset.cache_dir={tmp_path}"])
    with pytest.raises(ArchiFactoryError, match=r"\(no network\).*dataset=text dataset.path="):
        load_data(cfg.dataset, seq_len=8, seed=0)


def test_client_errors_become_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="can't reach"), hub.hub_errors("dataset 'x'"):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")
    with pytest.raises(ArchiFactoryError, match="is gated.*export HF_TOKEN"), hub.hub_errors("dataset 'x'"):
        raise RuntimeError(
            "Dataset 'x' is a gated dataset on the Hub. You must be authenticated to access it."
        )
    with pytest.raises(ArchiFactoryError, match="not found"), hub.hub_errors("tokenizer 'x'"):
        raise OSError("x is not a local folder and is not a valid model identifier")
    with pytest.raises(ValueError), hub.hub_errors("dataset 'x'"):
        raise ValueError("an unrelated bug keeps its traceback")


def test_gated_dataset_without_token(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    cfg = compose_config(["dataset=pints", f"dataset.cache_dir={tmp_path}"])
    with pytest.raises(ArchiFactoryError, match=r"'pints-ai/Expository-Prose-V1' is gated.*export HF_TOKEN="):
        load_data(cfg.dataset, seq_len=8, seed=0)


def test_hf_without_a_name(tmp_path) -> None:
    cfg = compose_config(["dataset=hf", f"dataset.cache_dir={tmp_path}"])
    with pytest.raises(ArchiFactoryError, match=r"dataset=hf needs dataset.name=<hub dataset id>"):
        load_data(cfg.dataset, seq_len=8, seed=0)


def test_cli_default_dataset_offline_is_one_line_and_exit_1(tmp_path) -> None:
    """The default dataset (TinyStories) with no Hub stops with the message, not a traceback or a hang."""
    env = {**os.environ, "ARCHIFACTORY_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "archifactory", "data", "prepare"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: can't reach the Hugging Face Hub") and "dataset=text dataset.path=" in last


@pytest.mark.parametrize("dataset", ["dataset=text", "dataset=chat_jsonl"])
def test_a_missing_dataset_file_is_named_before_the_model_is_built(dataset: str, tmp_path) -> None:
    """The first refusal is the mistyped path (here beside a mixin option the meta-device build refuses):
    no parameter matching, no build, nothing written."""
    from archifactory.train.loop import train

    cfg = compose_config(
        [dataset, f"dataset.path={tmp_path / 'missing.jsonl'}", "mixin=mamba2", "mixin.head_dim=7"]
    )
    with pytest.raises(ArchiFactoryError, match="missing.jsonl does not exist"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()

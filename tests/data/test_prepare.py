"""Preparation: packing, splits, caps, and the content-keyed cache (reuse, invalidation, atomic, corrupt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data, load_tokenizer
from archifactory.data import prepare as prep
from archifactory.data.shards import ShardWriter, token_dtype
from archifactory.data.tokenizer import split_for_encoding
from tests.data.conftest import make_text


def read_split(data, split: str) -> np.ndarray:
    stream = data.train_stream if split == "train" else data.val_stream
    return np.concatenate([np.asarray(a) for a in stream.arrays]) if stream.arrays else np.zeros(0)


def expected_tokens(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tok.encode(doc) + [tok.eos_id]
    return out


def test_packing_keeps_every_token_once_with_eos_between_documents(corpus, make_cfg) -> None:
    data = load_data(make_cfg(path=str(corpus), shard_tokens=97), seq_len=16, seed=0)
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    # every 4th document (val_fraction 0.25), starting with the first, is held out
    val_docs = [d for i, d in enumerate(docs) if i % 4 == 0]
    train_docs = [d for i, d in enumerate(docs) if i % 4 != 0]
    train, val = read_split(data, "train"), read_split(data, "val")
    assert train.tolist() == expected_tokens(data.tokenizer, train_docs)
    assert val.tolist() == expected_tokens(data.tokenizer, val_docs)
    splits = data.manifest["splits"]
    assert len(splits["train"]["shards"]) > 3  # small shards: the stream really crosses files
    assert all(s["tokens"] == 97 for s in splits["train"]["shards"][:-1])
    assert (
        splits["train"]["tokens"] == len(train) == sum(len(data.tokenizer.encode(d)) + 1 for d in train_docs)
    )
    assert splits["train"]["documents"] == len(train_docs) == int((train == data.eos_id).sum())
    assert splits["val"]["bytes"] == sum(len(d.encode("utf-8")) for d in val_docs)
    assert data.tokenizer.decode(train[: train.tolist().index(data.eos_id)].tolist()) == train_docs[0]


def test_jsonl_parquet_and_doc_separator(tmp_path, make_cfg) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = [make_text(i, 4) for i in range(6)]
    (folder / "a.jsonl").write_text(
        "".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows[:3]))
    )
    pq.write_table(pa.table({"body": rows[3:], "n": [1, 2, 3]}), folder / "b.parquet")
    (folder / "c.txt").write_text("first story\n<|sep|>second story\n<|sep|>  \n")
    data = load_data(
        make_cfg(path=str(folder), text_field="body", doc_separator="<|sep|>"), seq_len=8, seed=0
    )
    docs = [*rows, "first story\n", "second story\n"]  # the whitespace-only piece is dropped
    assert data.manifest["splits"]["train"]["documents"] + data.manifest["splits"]["val"]["documents"] == len(
        docs
    )
    train = read_split(data, "train").tolist()
    assert train == expected_tokens(data.tokenizer, [d for i, d in enumerate(docs) if i % 4 != 0])


def test_doc_separator_typed_with_escapes(tmp_path, make_cfg) -> None:
    (tmp_path / "stories.txt").write_text("one little story\n\ntwo little story\n\nthree\n\nfour\n")
    data = load_data(
        make_cfg(path=str(tmp_path / "stories.txt"), doc_separator="\\n\\n", val_fraction=0.5), 2, 0
    )
    assert data.manifest["splits"]["train"]["documents"] + data.manifest["splits"]["val"]["documents"] == 4


def test_single_document_is_cut_into_train_head_and_val_tail(tmp_path, make_cfg) -> None:
    text = make_text(1, 200)
    (tmp_path / "one.txt").write_text(text)
    data = load_data(make_cfg(path=str(tmp_path / "one.txt"), val_fraction=0.1), seq_len=8, seed=0)
    head, tail = prep.split_text(text, 0.1)
    assert head + tail == text and head.endswith("\n") and 0.05 < len(tail) / len(text) < 0.15
    assert read_split(data, "val").tolist() == expected_tokens(data.tokenizer, [tail])


def test_caps_on_documents_and_tokens(corpus, make_cfg) -> None:
    capped = load_data(make_cfg(path=str(corpus), max_documents=5), seq_len=8, seed=0)
    assert capped.manifest["splits"]["train"]["documents"] == 5
    capped = load_data(make_cfg(path=str(corpus), max_tokens=1000), seq_len=8, seed=0)
    assert capped.manifest["splits"]["train"]["tokens"] == 1000 == len(read_split(capped, "train"))


def test_chunked_encoding_equals_whole_document_encoding(corpus, make_cfg) -> None:
    tok = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0).tokenizer
    text = "".join(make_text(i, 60) for i in range(8)) + "tail  \n\n  with spaces\nend"
    pieces = list(split_for_encoding(text, size=500))
    assert len(pieces) > 5 and "".join(pieces) == text
    assert tok.encode_batch([text])[0] == tok.encode(text)


def test_cache_is_reused_without_tokenizing(corpus, make_cfg, monkeypatch, caplog) -> None:
    first = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    assert not first.reused_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prep, "tokenize_to_shards", no_tokenizing)
    monkeypatch.setattr(prep, "train_bpe", no_tokenizing)
    with caplog.at_level("INFO", logger="archifactory.data"):
        second = load_data(make_cfg(path=str(corpus)), seq_len=32, seed=5)
    assert second.reused_cache and second.cache_dir == first.cache_dir
    assert "no tokenization" in caplog.text
    assert load_tokenizer(second.tokenizer_path).encode("the king") == first.tokenizer.encode("the king")


def test_cache_key_follows_data_and_tokenizer(corpus, make_cfg) -> None:
    base = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    bigger_vocab = load_data(make_cfg(path=str(corpus), vocab_size=320), seq_len=8, seed=0)
    assert bigger_vocab.tokenizer_path != base.tokenizer_path and bigger_vocab.cache_dir != base.cache_dir
    (corpus / "doc_03.txt").write_text(make_text(99))
    edited = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    assert not edited.reused_cache and edited.cache_dir != base.cache_dir
    assert edited.manifest["tokenizer"]["hash"] != base.manifest["tokenizer"]["hash"]


def test_bpe_training_is_deterministic(corpus, tmp_path, make_cfg) -> None:
    a = load_data(make_cfg(path=str(corpus), cache_dir=str(tmp_path / "a")), seq_len=8, seed=0)
    b = load_data(make_cfg(path=str(corpus), cache_dir=str(tmp_path / "b")), seq_len=8, seed=1)
    assert a.manifest["tokenizer"]["hash"] == b.manifest["tokenizer"]["hash"]
    assert a.manifest["key"] == b.manifest["key"]


def test_interrupted_prepare_leaves_nothing_trusted(corpus, make_cfg, monkeypatch) -> None:
    cfg = make_cfg(path=str(corpus), shard_tokens=50)
    original = ShardWriter.write
    calls = {"n": 0}

    def dies_midway(self, tokens):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, tokens)

    monkeypatch.setattr(ShardWriter, "write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load_data(cfg, seq_len=8, seed=0)
    tokens_dir = Path(cfg.cache_dir) / "tokens"
    assert not [p for p in tokens_dir.iterdir() if p.is_dir()]
    monkeypatch.setattr(ShardWriter, "write", original)
    data = load_data(cfg, seq_len=8, seed=0)
    assert not data.reused_cache and data.manifest["splits"]["train"]["tokens"] > 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "mismatch"])
def test_corrupt_cache_is_a_clear_error_and_rebuild_fixes_it(corpus, make_cfg, damage) -> None:
    data = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    shard = data.cache_dir / data.manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[10] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[:-2]))
    elif damage == "manifest":
        (data.cache_dir / "manifest.json").write_text("{not json")
    else:  # a manifest from other settings under this folder's name
        manifest = json.loads((data.cache_dir / "manifest.json").read_text())
        (data.cache_dir / "manifest.json").write_text(json.dumps({**manifest, "key": "0" * 16}))
    with pytest.raises(
        ArchiFactoryError, match=r"token cache .*(corrupt|manifest|match).*dataset.rebuild=true"
    ):
        load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    rebuilt = load_data(make_cfg(path=str(corpus), rebuild=True), seq_len=8, seed=0)
    assert not rebuilt.reused_cache and rebuilt.cache_dir == data.cache_dir
    assert load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0).reused_cache


def test_token_width_follows_vocab() -> None:
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(152064) == np.uint32

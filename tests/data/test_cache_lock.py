"""The token cache's file lock (concurrent preparers) and `dataset.verify_cache=false`."""

from __future__ import annotations

import threading
import time

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.data import prepare as prep


def test_concurrent_preparers_tokenize_once_and_the_second_reuses(corpus, make_cfg, monkeypatch) -> None:
    """Two preparers of the same cache (ranks, sweep jobs): the second waits on the lock, then reuses.

    Threads stand in for processes: `flock` locks belong to the open file, so two opens of the lock file
    in one process exclude each other like two processes would.
    """
    load_data(make_cfg(path=str(corpus), name="warm"), seq_len=8, seed=0)  # tokenizer cached; not the tokens
    real = prep.tokenize_to_shards
    started, calls = threading.Event(), []

    def slow_tokenize(*args, **kwargs):
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the second preparer arrives while this one is still writing
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "tokenize_to_shards", slow_tokenize)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        results[name] = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(60)
    second.join(60)
    assert calls == ["first"], "the second preparer tokenized too: the lock did not hold it"
    assert not results["first"].reused_cache and results["second"].reused_cache
    assert results["second"].cache_dir == results["first"].cache_dir


def test_verify_cache_false_skips_the_checksums(corpus, make_cfg) -> None:
    data = load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    shard = data.cache_dir / data.manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # same size, other bytes: only a checksum can tell
    shard.write_bytes(bytes(raw))
    with pytest.raises(ArchiFactoryError, match="corrupt"):
        load_data(make_cfg(path=str(corpus)), seq_len=8, seed=0)
    unverified = load_data(make_cfg(path=str(corpus), verify_cache=False), seq_len=8, seed=0)
    assert unverified.reused_cache
    shard.write_bytes(bytes(raw[:-2]))  # a wrong size is still caught without checksums
    with pytest.raises(ArchiFactoryError, match="corrupt"):
        load_data(make_cfg(path=str(corpus), verify_cache=False), seq_len=8, seed=0)

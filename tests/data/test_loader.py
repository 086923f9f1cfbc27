"""The loader: shifted targets, seeded epochs, resume at the next batch, disjoint ranks, validation, bpb."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import PackedLoader, load_data
from archifactory.data.shards import ShardWriter, TokenStream

SEQ = 8


@pytest.fixture
def data(corpus, make_cfg):
    # small shards, so windows also cross shard files
    return load_data(make_cfg(path=str(corpus), shard_tokens=61), seq_len=SEQ, seed=3)


@pytest.fixture
def arange_stream(tmp_path) -> TokenStream:
    """Tokens 0..999 in shards of 61: window i starts with token i*SEQ, so every row names its window."""
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 61)
    writer.write(np.arange(1000))
    return TokenStream(tmp_path, writer.close(), np.dtype(np.uint16))


def stream_tokens(stream) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in stream.arrays]).astype(np.int64)


def test_batches_are_shifted_windows_and_an_epoch_visits_each_once(arange_stream) -> None:
    loader = PackedLoader(arange_stream, SEQ, batch_size=4, seed=3)
    assert loader.num_windows == 999 // SEQ and loader.batches_per_epoch == loader.num_windows // 4
    seen: list[int] = []
    for _ in range(loader.batches_per_epoch):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, SEQ) and inputs.dtype == torch.int64
        starts = inputs[:, 0]
        assert torch.equal(
            inputs, starts[:, None] + torch.arange(SEQ)
        )  # a whole packed window, across shards too
        assert torch.equal(targets, inputs + 1)
        assert bool((starts % SEQ == 0).all())
        seen += (starts // SEQ).tolist()
    assert len(set(seen)) == len(seen) == loader.batches_per_epoch * 4
    assert seen != sorted(seen)  # shuffled
    second_epoch = [(next(loader)[0][:, 0] // SEQ).tolist() for _ in range(3)]
    assert loader.epoch == 1 and second_epoch != [seen[i * 4 : i * 4 + 4] for i in range(3)]
    same_seed = PackedLoader(arange_stream, SEQ, batch_size=4, seed=3)
    other_seed = PackedLoader(arange_stream, SEQ, batch_size=4, seed=4)
    assert (
        (next(same_seed)[0][:, 0] // SEQ).tolist() == seen[:4] != (next(other_seed)[0][:, 0] // SEQ).tolist()
    )


def test_resume_mid_epoch_continues_with_the_next_batch(data) -> None:
    reference = data.train_loader(batch_size=3)
    n = reference.batches_per_epoch
    batches = [next(reference) for _ in range(n + 4)]  # runs into the second epoch
    for stop in (2, n - 1, n, n + 1):
        loader = data.train_loader(batch_size=3)
        for _ in range(stop):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))  # it goes into a JSON checkpoint
        resumed = data.train_loader(batch_size=3)
        resumed.load_state_dict(state)
        for expected in batches[stop : stop + 3]:
            got = next(resumed)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_resume_refuses_a_different_dataset_or_seq_len(data, corpus, make_cfg) -> None:
    state = data.train_loader(batch_size=2).state_dict()
    other = load_data(make_cfg(path=str(corpus), shard_tokens=61), seq_len=SEQ * 2, seed=3).train_loader(2)
    with pytest.raises(ArchiFactoryError, match="seq_len"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "change,message",
    [
        ("seed", "seed=3, this run has 4"),
        ("dataset", "num_windows=124|tokens=1000"),
        ("seq_len", "seq_len=8"),
    ],
)
def test_resume_guard_checks_seed_dataset_and_seq_len(tmp_path, arange_stream, change, message) -> None:
    """Each of the three differs alone here, and each alone must be refused."""
    state = PackedLoader(arange_stream, SEQ, 2, seed=3).state_dict()
    (tmp_path / "other").mkdir()
    writer = ShardWriter(tmp_path / "other", "train", np.dtype(np.uint16), 61)
    writer.write(np.arange(1001 if change == "dataset" else 1000))  # one token more: another dataset
    other_stream = TokenStream(tmp_path / "other", writer.close(), np.dtype(np.uint16))
    seq_len, seed = (SEQ * 2 if change == "seq_len" else SEQ), (4 if change == "seed" else 3)
    with pytest.raises(ArchiFactoryError, match=message):
        PackedLoader(other_stream, seq_len, 2, seed=seed).load_state_dict(state)


def test_ranks_read_disjoint_slices_of_the_same_global_order(arange_stream) -> None:
    single = PackedLoader(arange_stream, SEQ, batch_size=4, seed=0)
    ranks = [PackedLoader(arange_stream, SEQ, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(single.batches_per_epoch + 2):
        whole = next(single)[0]
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)
        assert not set(parts[0][:, 0].tolist()) & set(parts[1][:, 0].tolist())


def test_validation_batches_are_fixed_and_from_the_validation_split(data) -> None:
    val = data.val_batches(batch_size=3, max_tokens=SEQ * 7)
    assert [b[0].shape[0] for b in val] == [3, 3, 1]
    tokens = stream_tokens(data.val_stream)
    inputs = torch.cat([b[0] for b in val])
    targets = torch.cat([b[1] for b in val])
    assert torch.equal(inputs.flatten(), torch.from_numpy(tokens[: 7 * SEQ]))
    assert torch.equal(targets.flatten(), torch.from_numpy(tokens[1 : 7 * SEQ + 1]))
    again = data.val_batches(batch_size=3, max_tokens=SEQ * 7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again))
    everything = data.val_batches(batch_size=4, max_tokens=10**9)
    assert sum(b[0].numel() for b in everything) == (len(tokens) - 1) // SEQ * SEQ


def test_val_bytes_per_token_counts_true_utf8_bytes(corpus, data) -> None:
    docs = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    val_docs = [d for i, d in enumerate(docs) if i % 4 == 0]
    assert any(len(d.encode("utf-8")) > len(d) for d in val_docs)  # multi-byte characters are in there
    n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    n_tokens = sum(len(data.tokenizer.encode(d)) + 1 for d in val_docs)  # + EOS, which the loss also scores
    assert math.isclose(data.val_bytes_per_token, n_bytes / n_tokens)


def test_too_little_data_for_a_batch_is_a_clear_error(data) -> None:
    with pytest.raises(ArchiFactoryError, match="fewer than one batch"):
        data.train_loader(batch_size=10**6)
    data.seq_len = 10**6
    with pytest.raises(ArchiFactoryError, match="validation split"):
        data.val_batches(batch_size=2, max_tokens=10**7)


def test_every_world_size_reads_the_same_windows_per_step_across_an_epoch_end(tmp_path) -> None:
    """30 windows, global batch 4: the first epoch's 8th optimizer step takes its last 2 windows and the next
    epoch's first 2, alike for one rank, two ranks and one rank in micro-batches of 2 (gradient accumulation),
    so a resume from the step before the end, under any of them, continues the uninterrupted run."""
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 61)
    writer.write(np.arange(30 * SEQ + 1))
    stream = TokenStream(tmp_path, writer.close(), np.dtype(np.uint16))

    def steps(world: int, batch: int, count: int, state: dict | None = None) -> tuple[list[list[int]], dict]:
        ranks = [PackedLoader(stream, SEQ, batch, seed=0, rank=r, world_size=world) for r in range(world)]
        for loader in ranks:
            if state is not None:
                loader.load_state_dict(state)
        taken = []
        for _ in range(count):
            windows = [
                w for _ in range(4 // (batch * world)) for loader in ranks for w in next(loader)[0][:, 0]
            ]
            taken.append(sorted(int(w) // SEQ for w in windows))
        return taken, json.loads(json.dumps(ranks[0].state_dict()))

    reference, _ = steps(1, 4, 15)
    assert steps(2, 2, 15)[0] == steps(1, 2, 15)[0] == reference
    single = PackedLoader(stream, SEQ, 4, seed=0)
    order = [int(w) // SEQ for _ in range(15) for w in next(single)[0][:, 0]]
    assert sorted(order[:30]) == sorted(order[30:]) == list(range(30))  # each epoch: every window once
    _, before_end = steps(2, 2, 7)
    assert (before_end["epoch"], before_end["position"]) == (0, 28)
    for world, batch in [(2, 2), (1, 2), (1, 4)]:
        assert steps(world, batch, 8, before_end)[0] == reference[7:]

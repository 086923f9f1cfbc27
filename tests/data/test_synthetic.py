"""Synthetic probes: MQAR and MAD generators against their definitions, the seeded resumable stream, the
fixed validation set, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.data.synthetic import SyntheticData, mad
from archifactory.data.synthetic.mqar import gap_probabilities, mqar_example

IGNORE = -100


def mqar_cfg(**overrides):
    values = dict(name="mqar", source="synthetic", task="mqar", vocab_size=64, train_examples=None,
                  val_examples=64, num_kv_pairs=4, power_a=0.01, random_non_queries=True)  # fmt: skip
    return OmegaConf.create(values | overrides)


def mad_cfg(task: str, **overrides):
    values = dict(name=f"mad_{task}", source="synthetic", task=task, vocab_size=16, train_examples=None,
                  val_examples=32, noise_vocab_size=0, frac_noise=0.0, k_motif_size=1, v_motif_size=1,
                  num_tokens_to_copy=16)  # fmt: skip
    return OmegaConf.create(values | overrides)


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_keys_values_and_targets(random_non_queries: bool) -> None:
    vocab, seq_len, pairs = 64, 32, 4
    for index in range(50):
        rng = np.random.default_rng([3, index])
        inputs, targets = mqar_example(rng, vocab, seq_len, pairs, 0.5, random_non_queries)
        assert inputs.shape == targets.shape == (seq_len,)
        keys, values = inputs[0 : 2 * pairs : 2], inputs[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert keys.min() >= 1 and keys.max() < vocab // 2  # keys and values from disjoint halves
        assert values.min() >= vocab // 2 and values.max() < vocab
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        answers = np.flatnonzero(targets != IGNORE)
        assert len(answers) == pairs and answers.min() >= 2 * pairs  # one query per key, after the context
        assert sorted(inputs[answers].tolist()) == sorted(keys.tolist())  # each key queried exactly once
        for position in answers:
            assert targets[position] == bound[int(inputs[position])]  # its target is the bound value
        assert np.all((answers - 2 * pairs) % 2 == 0)
        if not random_non_queries:  # every non-context, non-query slot is the empty token 0
            filler = np.ones(seq_len, bool)
            filler[: 2 * pairs] = False
            filler[answers] = False
            assert np.all(inputs[filler] == 0)


def test_mqar_gaps_follow_the_power_law() -> None:
    probs = gap_probabilities(10, 0.01)
    assert probs.sum() == pytest.approx(1.0) and np.all(np.diff(probs) < 0)
    assert gap_probabilities(5, 1.0) == pytest.approx(np.full(5, 0.2))  # a = 1: uniform
    # with a small `power_a` queries cluster right after the context
    rng = np.random.default_rng(0)
    first = [np.flatnonzero(mqar_example(rng, 512, 128, 1, 0.01, False)[1] != IGNORE)[0] for _ in range(400)]
    uniform = [np.flatnonzero(mqar_example(rng, 512, 128, 1, 1.0, False)[1] != IGNORE)[0] for _ in range(400)]
    assert np.mean(first) < np.mean(uniform) - 20


def test_stream_is_seeded_fresh_and_resumable() -> None:
    data = SyntheticData(mqar_cfg(), seq_len=32, seed=7)
    loader = data.train_loader(batch_size=8)
    first, second = next(loader), next(loader)
    assert not np.array_equal(first[0], second[0])  # fresh examples every step
    again = SyntheticData(mqar_cfg(), seq_len=32, seed=7).train_loader(batch_size=8)
    assert np.array_equal(next(again)[0], first[0])  # same seed, same stream
    other = SyntheticData(mqar_cfg(), seq_len=32, seed=8).train_loader(batch_size=8)
    assert not np.array_equal(next(other)[0], first[0])
    # resume: a new loader continues exactly where the saved position was
    state = loader.state_dict()
    expected = next(loader)
    resumed = SyntheticData(mqar_cfg(), seq_len=32, seed=7).train_loader(batch_size=8)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    # the stream is the same examples for any batch size or world size
    halves = [SyntheticData(mqar_cfg(), 32, 7, rank=r, world_size=2).train_loader(4) for r in (0, 1)]
    assert np.array_equal(np.concatenate([next(h)[0] for h in halves]), first[0])
    with pytest.raises(ArchiFactoryError, match="another probe"):
        SyntheticData(mqar_cfg(num_kv_pairs=3), 32, 7).train_loader(8).load_state_dict(state)


def test_validation_is_fixed_and_disjoint_from_training() -> None:
    # a tiny task (vocab 8, 1 pair, length 8, no random filler) has few distinct examples: collisions
    # with the validation set are certain unless the stream redraws them
    cfg = mqar_cfg(vocab_size=8, num_kv_pairs=1, random_non_queries=False, val_examples=20)
    data = SyntheticData(cfg, seq_len=8, seed=0)
    val = {row.tobytes() for batch in data.val_batches(7) for row in batch[0].numpy()}
    assert sum(len(b[0]) for b in data.val_batches(7)) == 20
    assert len(val) > 1
    loader = data.train_loader(16)
    for _ in range(20):
        inputs, _ = next(loader)
        assert not any(row.tobytes() in val for row in inputs.numpy())
    again = SyntheticData(cfg, seq_len=8, seed=0).val_batches(7)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(data.val_batches(7), again, strict=True))


def test_pool_mode_cycles_a_fixed_set() -> None:
    data = SyntheticData(mqar_cfg(train_examples=6), seq_len=32, seed=1)
    loader = data.train_loader(batch_size=3)
    epoch = np.concatenate([next(loader)[0], next(loader)[0]])
    nxt = np.concatenate([next(loader)[0], next(loader)[0]])
    assert len({row.tobytes() for row in epoch}) == 6
    assert {row.tobytes() for row in epoch} == {row.tobytes() for row in nxt}  # same pool, new order
    assert not np.array_equal(epoch, nxt)


def test_load_data_dispatches_to_the_probe() -> None:
    data = load_data(mqar_cfg(), seq_len=32, seed=0)
    assert isinstance(data, SyntheticData) and data.vocab_size == 64 and data.marks_answers


@pytest.mark.parametrize(
    ("cfg", "seq_len", "message"),
    [
        (mqar_cfg(num_kv_pairs=9), 32, "num_kv_pairs"),
        (mqar_cfg(), 31, "even"),
        (mqar_cfg(vocab_size=6), 32, "vocab_size"),
        (mqar_cfg(power_a=0.0), 32, "power_a"),
        (mqar_cfg(val_examples=0), 32, "val_examples"),
        (mad_cfg("nope"), 32, "unknown MAD task"),
        (mad_cfg("???"), 32, "needs a task"),
        (mad_cfg("selective_copying", num_tokens_to_copy=16), 32, "num_tokens_to_copy"),
        (mad_cfg("noisy_in_context_recall"), 32, "noise_vocab_size"),
        (mqar_cfg(task="compression"), 32, "does not belong"),
        (mad_cfg("mqar"), 32, "does not belong"),
    ],
)
def test_bad_options_are_one_line_errors(cfg, seq_len: int, message: str) -> None:
    with pytest.raises(ArchiFactoryError, match=message):
        SyntheticData(cfg, seq_len=seq_len, seed=0)


class ScriptedRng:
    """Stands in for numpy's Generator with scripted draws, for hand-worked examples."""

    def __init__(self, **scripts) -> None:
        self.scripts = {k: list(v) for k, v in scripts.items()}

    def _next(self, name: str):
        return self.scripts[name].pop(0)

    def integers(self, *args, **kwargs):
        return self._next("integers")

    def choice(self, a, size=None, replace=True, p=None):
        return self._next("choice")

    def random(self):
        return self._next("random")

    def multinomial(self, n, pvals):
        return np.asarray(self._next("multinomial"))


def test_in_context_recall_by_hand() -> None:
    # vocab 8: keys 0-3, values 4-7; length 8 = 4 slots: three pairs, then a query of a shown key.
    # pairs: (1,5) (2,6) (1,5 again: an answer), query 2 -> 6
    rng = ScriptedRng(integers=[0], choice=[1, 5, 2, 6, 1, 2])
    inputs, targets = mad.in_context_recall(rng, seq_len=8, vocab_size=8, train=False)
    assert inputs.tolist() == [1, 5, 2, 6, 1, 5, 2, 6]
    assert targets.tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, 5, IGNORE, 6, IGNORE]
    rng = ScriptedRng(integers=[0], choice=[1, 5, 2, 6, 1, 2])
    _, train_targets = mad.in_context_recall(rng, seq_len=8, vocab_size=8, train=True)
    assert train_targets.tolist() == [5, 2, 6, 1, 5, 2, 6, IGNORE]  # training: every next token


def test_noisy_in_context_recall_by_hand() -> None:
    # vocab 12 with 4 noise tokens (8-11): keys 0-3, values 4-7. Slot 0 is the guaranteed pair; slot 1 is
    # noise (random 0.1 < 0.5), slot 2 a pair (0.9); the query repeats key 3.
    rng = ScriptedRng(integers=[0], random=[0.1, 0.9], choice=[3, 7, np.array([9, 11]), 0, 4, 3])
    inputs, targets = mad.in_context_recall(rng, 8, 12, False, noise_vocab_size=4, frac_noise=0.5)
    assert inputs.tolist() == [3, 7, 9, 11, 0, 4, 3, 7]
    assert targets.tolist() == [IGNORE] * 6 + [7, IGNORE]


def test_fuzzy_in_context_recall_by_hand() -> None:
    # vocab 9: pad 8, keys 0-3, values 4-7; motifs up to 2 tokens; validation keys are 2 tokens long.
    # probe key (0,1) -> value (4,); limit = 12 - 3 - 4 = 5; probe placed first (slot 0), then
    # key (2,3) -> (5,6), then the final query (0,1) -> (4,) and left padding to 12.
    rng = ScriptedRng(
        choice=[np.array([0, 1]), np.array([4]), np.array([2, 3]), np.array([5, 6])],
        integers=[1, 0, 2],  # probe value size, probe slot, the second value's size
    )
    inputs, targets = mad.fuzzy_in_context_recall(rng, 12, 9, False, k_motif_size=2, v_motif_size=2)
    assert inputs.tolist() == [8, 8, 0, 1, 4, 2, 3, 5, 6, 0, 1, 4]
    assert targets.tolist() == [IGNORE] * 10 + [4, IGNORE]


def test_selective_copying_by_hand() -> None:
    # vocab 8: blank 6, copy 7; copy 2 tokens (3, 5) in length 10: 5 blanks split 2 before 3, 3 before 5
    rng = ScriptedRng(integers=[np.array([3, 5])], multinomial=[[2, 3]])
    inputs, targets = mad.selective_copying(rng, seq_len=10, vocab_size=8, num_tokens_to_copy=2)
    assert inputs.tolist() == [6, 6, 3, 6, 6, 6, 5, 7, 6, 6]
    assert targets.tolist() == [IGNORE] * 8 + [3, 5]


def test_compression_by_hand() -> None:
    rng = ScriptedRng(integers=[np.array([2, 0, 1])])
    inputs, targets = mad.compression(rng, seq_len=6, vocab_size=4)
    assert inputs.tolist() == [2, 0, 1, 3, 3, 3]
    assert targets.tolist() == [IGNORE, IGNORE, IGNORE, 2, 0, 1]


def test_memorization_by_hand_and_fixed_map() -> None:
    value_of = np.array([10, 12, 11])  # keys 0-2
    rng = ScriptedRng(integers=[np.array([2, 0])])
    inputs, targets = mad.memorization(rng, seq_len=4, vocab_size=16, value_of=value_of)
    assert inputs.tolist() == [2, 15, 0, 15]
    assert targets.tolist() == [IGNORE, 11, IGNORE, 10]
    table = mad.memorization_map(256, seed=3)
    assert len(table) == 127 and len(set(table.tolist())) == 127 and table.min() >= 127 and table.max() < 255
    assert np.array_equal(table, mad.memorization_map(256, seed=3))


@pytest.mark.parametrize("task", mad.MAD_TASKS)
def test_every_mad_task_at_paper_sizes(task: str) -> None:
    sizes = {
        "in_context_recall": (128, dict(vocab_size=16)),
        "noisy_in_context_recall": (128, dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2)),
        "fuzzy_in_context_recall": (128, dict(vocab_size=16, k_motif_size=3, v_motif_size=3)),
        "selective_copying": (256, dict(vocab_size=16, num_tokens_to_copy=16)),
        "compression": (62, dict(vocab_size=16)),
        "memorization": (32, dict(vocab_size=256)),
    }
    seq_len, options = sizes[task]
    data = SyntheticData(mad_cfg(task, **options), seq_len=seq_len, seed=0)
    inputs, targets = next(data.train_loader(4))
    assert inputs.shape == targets.shape == (4, seq_len)
    assert inputs.min() >= 0 and inputs.max() < options["vocab_size"]
    for _, batch_targets in data.val_batches(16):
        answers = batch_targets != IGNORE
        assert answers.any(dim=1).all()  # every validation example has answers
        assert batch_targets[answers].max() < options["vocab_size"]

"""Synthetic capability probes: `dataset=mqar` (Zoology) and `dataset=mad task=…` (the MAD suite).

They plug into the training loop through the same interface as token data (`load_data` returns a
`SyntheticData` when `dataset.source` is `synthetic`): `train_loader` is an endless, seeded, resumable
stream, `val_batches` a fixed validation set, and `marks_answers` tells the loop to score accuracy on the
answer positions (`val_accuracy`) instead of bits per byte.

Seeding. Training example i is drawn from `numpy.random.default_rng([seed, 1, i])` and validation
example j from `[seed, 2, j]`, one example per generator, so the stream does not depend on the batch
size or the number of ranks, the same seed gives the same stream, and the loader's position (examples
handed out) is all a checkpoint needs. `dataset.train_examples=N` instead cycles a fixed pool of N
examples in a seeded order per epoch (MAD's finite training sets); the default (null) draws fresh
examples for ever — with a small reused set attention memorises it and stalls at 1/pairs accuracy on
MQAR. A training example whose inputs equal a validation example's is redrawn (deterministically), so
validation never overlaps training.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.synthetic import mad
from archifactory.data.synthetic.mqar import check_mqar, mqar_example

Batch = tuple[torch.Tensor, torch.Tensor]
Example = tuple[np.ndarray, np.ndarray]
TRAIN_STREAM, VAL_STREAM, POOL_ORDER = 1, 2, 3
MAX_REDRAWS = 64


@dataclass
class ProbeSpec:
    """The resolved options of one probe (a plain copy of the `dataset` config node)."""

    task: str
    vocab_size: int
    train_examples: int | None
    val_examples: int
    options: dict[str, Any]


def probe_spec(cfg: Any) -> ProbeSpec:
    """Split a composed synthetic `dataset` node into the shared fields and the task's options."""
    if isinstance(cfg, DictConfig):
        if OmegaConf.is_missing(cfg, "task"):
            raise ArchiFactoryError(f"dataset=mad needs a task: task=<{'|'.join(mad.MAD_TASKS)}>")
        values = OmegaConf.to_container(cfg, resolve=True)
    else:
        values = dict(cfg) if isinstance(cfg, dict) else asdict(cfg)
    shared = {"name", "source", "task", "vocab_size", "train_examples", "val_examples"}
    return ProbeSpec(
        task=str(values["task"]),
        vocab_size=int(values["vocab_size"]),
        train_examples=values.get("train_examples"),
        val_examples=int(values["val_examples"]),
        options={k: v for k, v in values.items() if k not in shared},
    )


def build_generator(
    spec: ProbeSpec, seq_len: int, seed: int
) -> Callable[[np.random.Generator, bool], Example]:
    """A function (rng, train) -> one example, for the task in `spec`; bad options fail here."""
    o, v = spec.options, spec.vocab_size
    if (spec.task == "mqar") != ("num_kv_pairs" in o):  # e.g. dataset=mqar dataset.task=compression
        raise ArchiFactoryError(
            f"task {spec.task!r} does not belong to this dataset: use dataset=mqar, or dataset=mad task=<name>"
        )
    if spec.task == "mqar":
        check_mqar(v, seq_len, o["num_kv_pairs"], o["power_a"])
        make = functools.partial(
            mqar_example, vocab_size=v, seq_len=seq_len, num_kv_pairs=o["num_kv_pairs"],
            power_a=o["power_a"], random_non_queries=o["random_non_queries"],
        )  # fmt: skip
        return lambda rng, train: make(rng)
    mad.check_mad(spec.task, seq_len, v, o["noise_vocab_size"], o["frac_noise"], o["k_motif_size"],
                  o["v_motif_size"], o["num_tokens_to_copy"])  # fmt: skip
    if spec.task in ("in_context_recall", "noisy_in_context_recall"):
        noisy = spec.task == "noisy_in_context_recall"
        noise = {"noise_vocab_size": o["noise_vocab_size"], "frac_noise": o["frac_noise"]} if noisy else {}
        return lambda rng, train: mad.in_context_recall(rng, seq_len, v, train, **noise)
    if spec.task == "fuzzy_in_context_recall":
        k, kv = o["k_motif_size"], o["v_motif_size"]
        return lambda rng, train: mad.fuzzy_in_context_recall(rng, seq_len, v, train, k, kv)
    if spec.task == "selective_copying":
        return lambda rng, train: mad.selective_copying(rng, seq_len, v, o["num_tokens_to_copy"])
    if spec.task == "compression":
        return lambda rng, train: mad.compression(rng, seq_len, v)
    value_of = mad.memorization_map(v, seed)
    return lambda rng, train: mad.memorization(rng, seq_len, v, value_of)


def _seed(seed: int) -> int:
    return seed % (1 << 63)  # numpy seeds must be non-negative


class SyntheticData:
    """A probe task as the training loop sees a dataset: vocabulary, training stream, validation set."""

    marks_answers = True  # the loop reports val_accuracy on answer positions
    val_bytes_per_token = None  # no text, so no bits per byte
    tokenizer = None
    reused_cache = True
    description = "synthetic, generated on the fly (no download, no cache)"

    def __init__(self, cfg: Any, seq_len: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.spec = probe_spec(cfg)
        self.name = f"{self.spec.task} probe"
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.vocab_size = self.spec.vocab_size
        if self.spec.val_examples < 1:
            raise ArchiFactoryError(f"dataset.val_examples must be positive (got {self.spec.val_examples})")
        if self.spec.train_examples is not None and self.spec.train_examples < 1:
            raise ArchiFactoryError("dataset.train_examples must be positive, or null for a fresh stream")
        self.generate = build_generator(self.spec, seq_len, seed)
        pairs = [self.generate(np.random.default_rng([_seed(seed), VAL_STREAM, j]), False)
                 for j in range(self.spec.val_examples)]  # fmt: skip
        self.val_inputs = np.stack([p[0] for p in pairs])
        self.val_targets = np.stack([p[1] for p in pairs])
        self._val_keys = {row.tobytes() for row in self.val_inputs}
        settings = {"seq_len": seq_len, "seed": seed, **asdict(self.spec)}
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def train_example(self, index: int) -> Example:
        """Training example `index` of the stream (fresh stream) or of the pool (`train_examples`)."""
        for redraw in range(MAX_REDRAWS):
            rng = np.random.default_rng([_seed(self.seed), TRAIN_STREAM, index, redraw])
            example = self.generate(rng, True)
            if example[0].tobytes() not in self._val_keys:
                return example
        raise ArchiFactoryError(
            f"{self.name}: {MAX_REDRAWS} draws in a row hit the validation set; the task is too small for "
            "a disjoint validation set: raise dataset.vocab_size or trainer.seq_len, or lower dataset.val_examples"
        )

    def train_loader(self, batch_size: int, pin_memory: bool = False) -> SyntheticLoader:
        return SyntheticLoader(self, batch_size, self.rank, self.world_size, pin_memory)

    def val_batches(self, batch_size: int, max_tokens: int | None = None) -> list[Batch]:
        """The fixed validation set (all `dataset.val_examples`; `trainer.eval_tokens` does not apply)."""
        inputs, targets = torch.from_numpy(self.val_inputs), torch.from_numpy(self.val_targets)
        return [
            (inputs[i : i + batch_size], targets[i : i + batch_size])
            for i in range(0, len(inputs), batch_size)
        ]


class SyntheticLoader:
    """Endless `(inputs, targets)` int64 [batch_size, seq_len] for one rank; the position is one integer.

    Each optimizer step takes the next `world_size × batch_size` examples of the stream and rank r keeps
    the r-th `batch_size` of them (disjoint across ranks; the same global order for any world size)."""

    def __init__(
        self,
        data: SyntheticData,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ArchiFactoryError(f"batch size must be positive (got {batch_size})")
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.position = 0  # examples handed out so far, all ranks together
        self._order: tuple[int, np.ndarray] | None = None

    def _pool_index(self, index: int) -> int:
        """Pool mode: the stream visits the N pool examples in a fresh seeded permutation each epoch."""
        pool = self.data.spec.train_examples
        if pool is None:
            return index
        epoch = index // pool
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([_seed(self.data.seed), POOL_ORDER, epoch])
            self._order = (epoch, rng.permutation(pool))
        return int(self._order[1][index % pool])

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> Batch:
        first = self.position + self.rank * self.batch_size
        examples = [self.data.train_example(self._pool_index(first + i)) for i in range(self.batch_size)]
        self.position += self.batch_size * self.world_size
        inputs = torch.from_numpy(np.stack([e[0] for e in examples]))
        targets = torch.from_numpy(np.stack([e[1] for e in examples]))
        if self.pin_memory:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "probe": self.data.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of the same probe (task, options, seed, seq_len)."""
        if state.get("probe") != self.data.fingerprint:
            raise ArchiFactoryError(
                "the checkpoint's data position is for another probe (task, options, seed or seq_len differ); "
                "resume with the same dataset options, seed and trainer.seq_len"
            )
        self.position = int(state["position"])

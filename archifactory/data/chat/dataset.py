"""Chat data for the training loop: one conversation per row, right padded, loss on assistant tokens.

`ChatData` has the loop's data interface (`vocab_size`, `tokenizer`, `train_loader`, `val_batches`, …).
Each row holds one conversation rendered by the template, cut to `seq_len + 1` tokens (cuts are counted
and logged) and padded with EOS; its targets are the next tokens where those are assistant tokens, else
ignored (-100), so padding, system and user tokens never carry the loss and no conversation ever sees
another. Validation reports the loss and the next-token accuracy on assistant tokens. The training order
is a seeded permutation per epoch; the loader's position is checkpointed, so a resumed run continues
the same order.

Held out for validation: `ceil(val_fraction × conversations)` of them, evenly spread (every k-th), at least
one and never all — 12 conversations at the default 0.05 hold out one, so `val_loss` always measures
something. A single conversation cannot be split: refused with one line (`held_out`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.sources import conversations
from archifactory.data.chat.template import Message, chat_tokenizer, render
from archifactory.data.tokenizer import Tokenizer

IGNORE = -100
Example = tuple[np.ndarray, np.ndarray]  # inputs [T] and targets [T], int64
Batch = tuple[torch.Tensor, torch.Tensor]


def encode_conversation(tokenizer: Tokenizer, messages: list[Message], seq_len: int) -> tuple[Example, bool]:
    """(inputs, targets) of one conversation padded to seq_len, and whether it had to be cut."""
    rendered = render(tokenizer, messages)
    ids, mask = rendered.ids[: seq_len + 1], rendered.loss_mask[: seq_len + 1]
    truncated = len(rendered.ids) > seq_len + 1
    inputs = np.full(seq_len, tokenizer.eos_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    inputs[: len(ids) - 1] = ids[:-1]
    shifted = np.asarray(ids[1:], dtype=np.int64)
    targets[: len(ids) - 1] = np.where(np.asarray(mask[1:], dtype=bool), shifted, IGNORE)
    return (inputs, targets), truncated


def held_out(count: int, val_fraction: float, name: str) -> set[int]:
    """Indices of the validation conversations among `count`: ceil(count × val_fraction), at least 1 and
    at most count − 1, evenly spread (60 at 0.05: 19, 39, 59)."""
    if count < 2:
        raise ArchiFactoryError(
            f"dataset {name} has {count} conversation(s), too few to hold one out for validation; give it "
            "at least 2 (dataset.path, dataset.max_conversations)"
        )
    share = math.ceil(round(count * val_fraction, 9))  # round first: 60 × 0.05 is 3.0000000000000004
    held = min(count - 1, max(1, share))
    return {(j + 1) * count // held - 1 for j in range(held)}


def encode_chat(cfg: Any, tokenizer: Tokenizer, seq_len: int) -> tuple[list[Example], list[Example], int]:
    """(training rows, validation rows, conversations cut) of the chat `dataset` node `cfg`, encoded with
    `tokenizer` (one with the chat template's tokens); also how `eval perplexity` rebuilds the split."""
    examples: list[Example] = []
    truncated = 0
    for index, messages in enumerate(conversations(cfg)):
        if cfg.max_conversations is not None and index >= cfg.max_conversations:
            break
        example, cut = encode_conversation(tokenizer, messages, seq_len)
        truncated += cut
        examples.append(example)
    val_index = held_out(len(examples), cfg.val_fraction, cfg.name)
    train = [e for i, e in enumerate(examples) if i not in val_index]
    val = [e for i, e in enumerate(examples) if i in val_index]
    return train, val, truncated


def chat_val_batches(
    rows: list[Example], seq_len: int, batch_size: int, max_tokens: int | None
) -> list[Batch]:
    """Fixed validation batches: every held-out conversation (up to `max_tokens` tokens of rows)."""
    rows = rows if max_tokens is None else rows[: max(1, max_tokens // seq_len)]
    return [_stack(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


class ChatData:
    """Conversations of `cfg` (a chat `dataset` node) tokenized with `base` (the pretrained run's tokenizer,
    which the caller loads from `cfg.tokenizer_from`) plus the chat template's special tokens."""

    def __init__(
        self, cfg: Any, base: Tokenizer, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        folder = Path(cfg.cache_dir) / "tokenizers" / f"chat-{base.hash}"
        self.tokenizer: Tokenizer = chat_tokenizer(base, folder)
        self.vocab_size = self.tokenizer.vocab_size
        self.eos_id = self.tokenizer.eos_id
        self.val_bytes_per_token = None  # the loop then reports loss and accuracy on assistant tokens
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        train, val, truncated = encode_chat(cfg, self.tokenizer, seq_len)
        self.train, self.val = train, val
        self.examples_per_epoch = len(train)
        self.truncated = truncated
        self.fingerprint = hashlib.sha256(
            json.dumps([cfg.name, seq_len, seed, len(train), self.tokenizer.hash]).encode()
        ).hexdigest()[:16]
        self.description = (
            f"{cfg.name}: {len(train):,} training / {len(val):,} validation conversations, "
            f"{truncated:,} cut to {seq_len + 1} tokens (raise trainer.seq_len to keep them whole), "
            f"chat template with {self.vocab_size - base.vocab_size} new special tokens"
        )

    def train_loader(self, batch_size: int, pin_memory: bool = False) -> ChatLoader:
        return ChatLoader(self, batch_size, self.rank, self.world_size, pin_memory)

    def val_batches(self, batch_size: int, max_tokens: int | None = None) -> list[Batch]:
        """Fixed validation batches: every held-out conversation (up to `max_tokens` tokens of rows)."""
        return chat_val_batches(self.val, self.seq_len, batch_size, max_tokens)


def _stack(examples: list[Example]) -> Batch:
    return (
        torch.from_numpy(np.stack([e[0] for e in examples])),
        torch.from_numpy(np.stack([e[1] for e in examples])),
    )


class ChatLoader:
    """Endless batches of training conversations: a seeded permutation per epoch, each rank its slice."""

    def __init__(self, data: ChatData, batch_size: int, rank: int, world_size: int, pin_memory: bool) -> None:
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.position = 0  # conversations handed out so far, all ranks together
        self._order: tuple[int, np.ndarray] | None = None

    def _conversation(self, index: int) -> Example:
        count = self.data.examples_per_epoch
        epoch = index // count
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.data.seed, epoch])
            self._order = (epoch, rng.permutation(count))
        return self.data.train[int(self._order[1][index % count])]

    def __iter__(self) -> ChatLoader:
        return self

    def __next__(self) -> Batch:
        first = self.position + self.rank * self.batch_size
        inputs, targets = _stack([self._conversation(first + i) for i in range(self.batch_size)])
        self.position += self.batch_size * self.world_size
        if self.pin_memory:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "chat": self.data.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("chat") != self.data.fingerprint:
            raise ArchiFactoryError(
                "the checkpoint's data position is for other chat data (dataset, seq_len, seed or tokenizer "
                "differ); resume with the same dataset and trainer settings"
            )
        self.position = int(state["position"])

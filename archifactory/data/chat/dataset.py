"""Chat data for the training loop: one conversation per row, right padded, loss on assistant tokens.

`ChatData` has the loop's data interface (`vocab_size`, `tokenizer`, `train_loader`, `val_batches`, …).
Each row holds one conversation rendered by the template, cut to `seq_len + 1` tokens (cuts are counted
and logged) and padded with EOS; its targets are the next tokens where those are assistant tokens, else
ignored (-100), so padding, system and user tokens never carry the loss and no conversation ever sees
another. Validation reports the loss and the next-token accuracy on assistant tokens. The training order
is a seeded permutation per epoch; the loader's position is checkpointed, so a resumed run continues
the same order.
"""

from __future__ import annotations

import hashlib
import json
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
        train, val, truncated = self._encode(cfg, seq_len)
        if not train:
            raise ArchiFactoryError(f"dataset {cfg.name}: no training conversations; check dataset.path")
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

    def _encode(self, cfg: Any, seq_len: int) -> tuple[list[Example], list[Example], int]:
        """Every `round(1 / val_fraction)`-th conversation is held out for validation."""
        every = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        train: list[Example] = []
        val: list[Example] = []
        truncated = 0
        for index, messages in enumerate(conversations(cfg)):
            if cfg.max_conversations is not None and index >= cfg.max_conversations:
                break
            example, cut = encode_conversation(self.tokenizer, messages, seq_len)
            truncated += cut
            (val if every and index % every == every - 1 else train).append(example)
        return train, val, truncated

    def train_loader(self, batch_size: int, pin_memory: bool = False) -> ChatLoader:
        return ChatLoader(self, batch_size, self.rank, self.world_size, pin_memory)

    def val_batches(self, batch_size: int, max_tokens: int | None = None) -> list[Batch]:
        """Fixed validation batches: every held-out conversation (up to `max_tokens` tokens of rows)."""
        rows = self.val if max_tokens is None else self.val[: max(1, max_tokens // self.seq_len)]
        return [_stack(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


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

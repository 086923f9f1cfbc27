"""Where conversations come from: local chat JSONL, LIMO and Dolphin-R1 (Hugging Face Hub).

Every source yields conversations as lists of `{"role", "content"}` messages:
- `chat_jsonl`: local files with one `{"messages": [{"role", "content"}, …]}` object per line (the common
  format of chat SFT data); a file, folder or glob;
- `limo` (GAIR/LIMO, Ye et al., "LIMO: Less is More for Reasoning", 2025): `question` → user,
  `solution` → assistant;
- `dolphin_r1` (cognitivecomputations/dolphin-r1): the `reasoning-deepseek` / `reasoning-flash` subsets
  have `messages` plus a `reasoning` trace and an `answer`, which become the assistant turn
  `<think>{reasoning}</think>{answer}`; the `nonreasoning` subset's `messages` are used as they are.
Hub sources go through the real `datasets.load_dataset`, with the data pipeline's one-line errors when
the Hub cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub
from archifactory.data.chat.template import ROLES, THINK_CLOSE, THINK_OPEN, Message
from archifactory.data.sources import resolve_files

HUB_IDS = {"limo": "GAIR/LIMO", "dolphin_r1": "cognitivecomputations/dolphin-r1"}


def conversations(cfg: Any) -> Iterator[list[Message]]:
    """The conversations of the `dataset` config node (`format`: chat_jsonl | limo | dolphin_r1)."""
    if cfg.format == "chat_jsonl":
        yield from _chat_jsonl(cfg.path)
    elif cfg.format in HUB_IDS:
        rows = _hub_rows(cfg.path or HUB_IDS[cfg.format], cfg.hf_config, cfg.split, cfg.revision)
        convert = _limo if cfg.format == "limo" else _dolphin
        yield from (convert(row) for row in rows)
    else:
        raise ArchiFactoryError(f"dataset.format={cfg.format!r} is not one of chat_jsonl, limo, dolphin_r1")


def _check(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ArchiFactoryError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ArchiFactoryError(
                f"{where}: every message needs a role in {', '.join(ROLES)} and a text content, got {message!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ArchiFactoryError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _chat_jsonl(pattern: str | None) -> Iterator[list[Message]]:
    if not pattern:
        raise ArchiFactoryError(
            "dataset=chat_jsonl needs dataset.path=<file, folder or glob of .jsonl files>"
        )
    for path in resolve_files(pattern):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ArchiFactoryError(
                f"{path} is not UTF-8 text (byte {error.start}); convert it to UTF-8"
            ) from error
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ArchiFactoryError(
                    f"{where} is not valid JSON ({error.msg}); fix or remove that line"
                ) from error
            if not isinstance(record, dict):
                raise ArchiFactoryError(f"{where}: expected an object with `messages`")
            yield _check(record.get("messages"), where)


def _hub_rows(name: str, config: str | None, split: str, revision: str | None) -> Iterator[dict]:
    what = f"dataset {name!r}"
    hub.check_hub(what)
    with hub.hub_errors(what):
        import datasets

        data = datasets.load_dataset(name, config, split=split, revision=revision)
    with hub.hub_errors(what):
        yield from data


def _limo(row: dict) -> list[Message]:
    for field in ("question", "solution"):
        if not isinstance(row.get(field), str):
            raise ArchiFactoryError(f"GAIR/LIMO row without a text `{field}` (has: {', '.join(row)})")
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["solution"]}]


def _dolphin(row: dict) -> list[Message]:
    messages = row.get("messages")
    if isinstance(row.get("reasoning"), str) and isinstance(row.get("answer"), str):
        prompt = [m for m in messages or [] if m.get("role") != "assistant"]
        answer = f"{THINK_OPEN}{row['reasoning']}{THINK_CLOSE}{row['answer']}"
        messages = [*prompt, {"role": "assistant", "content": answer}]
    return _check(messages, "cognitivecomputations/dolphin-r1 row")

"""The chat template: role markers as special tokens, and which tokens carry the loss.

A conversation renders as

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n …

with `<think>…</think>` around a reasoning trace inside an assistant turn (Dolphin-R1's reasoning
subsets, LIMO's solutions are kept as they are). The markers are added to the pretrained tokenizer as
special tokens (never split, never produced by ordinary text), so text without them tokenizes exactly as
in pretraining. Only assistant content and the `<|end|>` closing an assistant turn carry the loss: the
model learns to answer and to stop; system and user tokens, and the role headers, are context.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.tokenizer import Tokenizer, load_tokenizer

TEMPLATE_NAME = "archifactory-chat-v1"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END, THINK_OPEN, THINK_CLOSE)

Message = dict[str, str]


@dataclass
class Rendered:
    """A conversation as token ids and, per token, whether it carries the loss (an assistant token)."""

    ids: list[int]
    loss_mask: list[bool]


def chat_tokenizer(pretrained: Tokenizer, target: Path) -> Tokenizer:
    """The pretrained tokenizer plus the template's special tokens, written to `target` (atomically).

    The new tokens get the ids after the pretrained vocabulary, in `SPECIAL_TOKENS` order; meta.json
    records the template so `generate`/`eval` can apply it to the SFT run."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(pretrained.backend.to_str())
    added = [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    backend.add_special_tokens(added)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    backend.save(str(tmp / "tokenizer.json"))
    meta = {
        "kind": pretrained.kind,
        "name": f"{pretrained.name}+chat",
        "eos_id": pretrained.eos_id,
        "chat_template": TEMPLATE_NAME,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return load_tokenizer(target)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer was extended by `chat_tokenizer` (an SFT run's)."""
    meta = Path(tokenizer.path) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("chat_template") == TEMPLATE_NAME


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.backend.token_to_id(token)
    if token_id is None:
        raise ArchiFactoryError(f"the tokenizer has no {token} token: is this an SFT run's tokenizer?")
    return token_id


def render(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> Rendered:
    """Token ids and loss mask of `messages`; with `add_generation_prompt`, end with an open assistant
    header (what generation continues from)."""
    ids: list[int] = []
    mask: list[bool] = []

    def add(token_ids: list[int], loss: bool) -> None:
        ids.extend(token_ids)
        mask.extend([loss] * len(token_ids))

    newline = tokenizer.encode("\n")
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ArchiFactoryError(
                f"a message must be {{'role': one of {', '.join(ROLES)}, 'content': <text>}}, got {message!r}"
            )
        assistant = role == "assistant"
        add([special_id(tokenizer, f"<|{role}|>")] + newline, False)
        add(tokenizer.encode(content), assistant)  # markers inside (<think>…) map to their special ids
        add([special_id(tokenizer, END)], assistant)  # the model learns to close its own turn
        add(newline, False)
    if add_generation_prompt:
        add([special_id(tokenizer, "<|assistant|>")] + newline, False)
    return Rendered(ids, mask)


def chat_text(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The rendered conversation as text (markers included), for tools that take a prompt string (lm-eval's
    `apply_chat_template`); encoding it with the chat tokenizer gives `render(...).ids`."""
    parts = [f"<|{m['role']}|>\n{m['content']}{END}\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)

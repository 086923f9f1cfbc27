"""Write a local chat file (JSONL, one `{"messages": [...]}` conversation a line) from plays in plain text:
each conversation is one speech as the user's turn and the speech that answers it as the assistant's.

    python scripts/make_chat_file.py ../shared/data/shakespeare examples/chat/shakespeare_dialogue.jsonl
    archifactory sft init_from=<run> dataset=chat_jsonl dataset.path=examples/chat/shakespeare_dialogue.jsonl

A speech is a block of lines after a speaker line ("Ham.", "First Clown.") up to the next blank line;
`examples/chat/shakespeare_dialogue.jsonl` (the SFT file of `experiment=seed_protocol_cpu`) is this
command's output on the Shakespeare corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from archifactory.runs.files import write_atomic

SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")  # "Ham.", "First Clown.", "Lady Macbeth."
MIN_WORDS, MAX_WORDS = 4, 60


def speeches(text: str) -> list[str]:
    """Each speech of a play as one line of text, in order (stage directions in brackets dropped)."""
    out, speech, speaking = [], [], False
    for raw in [*text.splitlines(), ""]:
        line = raw.strip()
        if SPEAKER.match(line):
            speech, speaking = [], True
        elif not line:
            if speaking and speech:
                out.append(" ".join(speech))
            speech, speaking = [], False
        elif speaking and not line.startswith("["):
            speech.append(line)
    return out


def exchanges(texts: list[str]) -> list[tuple[str, str]]:
    """(speech, the answering speech) for consecutive speeches of MIN_WORDS..MAX_WORDS words each."""
    pairs = []
    for text in texts:
        said = speeches(text)
        pairs += [
            (a, b)
            for a, b in zip(said, said[1:])
            if all(MIN_WORDS <= len(s.split()) <= MAX_WORDS for s in (a, b))
        ]
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", type=Path, help="a .txt file or a folder of them")
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = sorted(args.text.glob("*.txt")) if args.text.is_dir() else [args.text]
    if not files or not all(path.is_file() for path in files):
        print(
            f"error: no .txt file at {args.text}: give a plain-text file or a folder of them", file=sys.stderr
        )
        return 1
    pairs = exchanges([path.read_text(encoding="utf-8", errors="replace") for path in files])
    if len(pairs) < args.count:
        print(
            f"error: {args.text} has {len(pairs)} usable exchanges, fewer than --count {args.count}: lower it",
            file=sys.stderr,
        )
        return 1
    chosen = random.Random(args.seed).sample(pairs, args.count)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # written whole or not at all
    lines = [
        json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]})
        for a, b in chosen
    ]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out} ({args.count} conversations from {len(files)} file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

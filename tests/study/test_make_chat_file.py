"""scripts/make_chat_file.py: the chat file of `experiment=seed_protocol_cpu` from plays in plain text — one
speech as the user's turn, the speech answering it as the assistant's; bad input is one `error:` line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_chat_file.py"

PLAY = """ACT I.

Scene I. A platform.

[Enter Bernardo.]

Ber.
Who's there? Stand and unfold yourself now.

Fran.
Nay, answer me: stand, and unfold
yourself, I say.

Ber.
Long live the king, and all his house!

[Exit.]
"""


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_each_speech_is_answered_by_the_next(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text(PLAY)
    out = tmp_path / "chat.jsonl"
    done = make(str(tmp_path), str(out), "--count", "2")
    assert done.returncode == 0, done.stderr
    turns = sorted(
        tuple(m["content"] for m in json.loads(line)["messages"]) for line in out.read_text().splitlines()
    )
    assert turns == [
        ("Nay, answer me: stand, and unfold yourself, I say.", "Long live the king, and all his house!"),
        ("Who's there? Stand and unfold yourself now.", "Nay, answer me: stand, and unfold yourself, I say."),
    ]  # speeches joined across lines; stage directions and headings left out


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text(PLAY)
    out = tmp_path / "chat.jsonl"
    for args in ([str(tmp_path / "missing"), str(out)], [str(tmp_path), str(out), "--count", "3"]):
        done = make(*args)
        assert done.returncode == 1 and done.stderr.startswith("error:") and done.stderr.count("\n") == 1
        assert not out.exists()

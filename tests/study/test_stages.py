"""A study stage is the `archifactory` program in a process of its own (forked from the study's fork server):
its stdout and stderr are appended to the study log, its exit status is the stage's, and a failure's detail
is the program's last stderr line."""

from __future__ import annotations

from pathlib import Path

import pytest

from archifactory.study import stages
from archifactory.study.stages import run_verb


def test_a_stage_runs_the_program_and_reports_its_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--help` and an unknown verb need none of the engines: the fork server this test starts preloads
    # nothing (the study tests run a real study, preloaded, as `archifactory study`)
    monkeypatch.setattr(stages, "PRELOAD", ())
    log = tmp_path / "study" / "study.log"
    assert run_verb(["--help"], log).ok
    failed = run_verb(["no-such-verb"], log)
    assert not failed.ok and failed.detail.startswith("error: unknown verb 'no-such-verb'")
    text = log.read_text()
    assert text.startswith("$ archifactory --help\nusage: archifactory")  # the header, then its stdout
    assert text.index("$ archifactory no-such-verb\n") < text.index("error: unknown verb")  # its stderr after

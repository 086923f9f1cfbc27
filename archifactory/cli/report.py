"""`archifactory report <sweep dir | run dir …> [--out DIR]`: results table and plots (`archifactory.report`)."""

from __future__ import annotations

from archifactory.report import main as report_main


def report_cli(args: list[str]) -> int:
    return report_main(args)

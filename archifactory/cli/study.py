"""`archifactory study [-m] <sweep overrides…> study.dir=<folder> [study.sft=<dataset>] [study.eval=a,b]`:
the seed's protocol over every variant of a sweep, resumable, ending in one report
(`archifactory.study.run`)."""

from __future__ import annotations

from archifactory.study.run import parse_study_args, run_study


def study_main(args: list[str]) -> int:
    return run_study(parse_study_args(args))

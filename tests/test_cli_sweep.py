"""Hydra sweep syntax passes the CLI's group pre-check and expands as Hydra documents it.

The sweeps run in-process through the real `run_hydra` path with a recording task instead of training,
so each expansion costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from archifactory.cli.hydra_app import check_group_choices, run_hydra
from archifactory.cli.main import main
from archifactory.config.compose import group_options
from archifactory.core.errors import ArchiFactoryError


def sweep(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    monkeypatch.chdir(tmp_path)
    jobs: list[tuple[str, str, int]] = []
    run_hydra(
        lambda cfg: jobs.append((cfg.mixin.name, cfg.positional.name, cfg.seed)),
        "train",
        ["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/job_logging=disabled"],
    )
    return jobs


def test_glob_expands_to_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = sweep(["positional=glob(*)"], tmp_path, monkeypatch)
    assert sorted(p for _, p, _ in jobs) == sorted(group_options("positional"))


def test_glob_with_exclude_choice_and_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = sweep(
        ["positional=glob(*,exclude=[learned,sinusoidal,none])", "mixin=choice(gqa,rwkv6)", "seed=range(2)"],
        tmp_path,
        monkeypatch,
    )
    assert sorted(jobs) == sorted(
        (m, p, s) for m in ("gqa", "rwkv6") for p in ("alibi", "rope") for s in (0, 1)
    )


def test_comma_list_still_sweeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(sweep(["mixin=gqa,retnet"], tmp_path, monkeypatch)) == [
        ("gqa", "rope", 0),
        ("retnet", "rope", 0),
    ]


@pytest.mark.parametrize(
    "arg,message",
    [
        ("mixin=nope", "unknown mixin 'nope'; choose one of: "),
        ("mixin=gqa,nope", "unknown mixin 'nope'"),
        ("mixin=choice(gqa,nope)", "unknown mixin 'nope'"),
        ("ffn=glob(zzz*)", "ffn=glob(zzz*) matches no ffn; choose among: "),
    ],
)
def test_unknown_choices_are_one_line_errors(arg: str, message: str) -> None:
    with pytest.raises(
        ArchiFactoryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        check_group_choices([arg])


def test_globs_become_the_options_they_match() -> None:
    """Hydra would also match the ConfigStore's `_schema_*` entries of the group: not runnable choices."""
    assert check_group_choices(["positional=glob(*,exclude=[learned,none])", "seed=0"]) == [
        "positional=alibi,rope,sinusoidal",
        "seed=0",
    ]


def test_what_the_precheck_leaves_to_hydra() -> None:
    """Flags, deletions, null, interpolations, ranges and non-group keys pass the pre-check untouched."""
    args = [
        "-m",
        "--cfg",
        "job",
        "~experiment",
        "experiment=null",
        "mixin=${oc.env:X,gqa}",
        "seed=range(3)",
        "model.hidden_size=64",
        "hydra/launcher=slurm",
        "mixin=choice(gqa",
    ]
    assert check_group_choices(args) == args


def test_cli_reports_an_unknown_choice_inside_a_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-m", "mixin=choice(gqa,nope)"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unknown mixin 'nope'")

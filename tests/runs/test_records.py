"""summary.json has several writers (training, `archifactory eval`, a failed sweep job): each changes only its
own keys, under the summary lock, so none loses what another wrote — also when they interleave."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

from archifactory.runs import layout, records
from archifactory.train.metrics import RunRecorder

PACKAGE = Path(__file__).resolve().parents[2] / "archifactory"


def eval_section(run_dir: Path, name: str, value: float) -> None:
    """What `archifactory eval` does to the summary (eval/results.py): add one task to the `eval` section."""

    def add(summary: dict) -> None:
        summary.setdefault("eval", {})[name] = {"metric": "acc", "value": value}

    records.modify_summary(run_dir, add)


def test_an_eval_written_while_training_resumes_survives_every_training_write(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    records.update_summary(run_dir, {"status": "interrupted", "steps": 10, "eval": {"mmlu": {"value": 0.3}}})
    recorder = RunRecorder(run_dir, enabled=True, base_summary={"mixin": "gqa"})
    recorder.start(resume_step=10, previous_summary=records.read_summary(run_dir))
    eval_section(run_dir, "hellaswag", 0.5)  # an evaluation lands while the run trains
    recorder.update_summary(steps=20, val_loss=2.5)
    recorder.finish(status="completed", steps=30)
    summary = json.loads(layout.summary_path(run_dir).read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["val_loss"] == 2.5
    assert summary["eval"] == {"mmlu": {"value": 0.3}, "hellaswag": {"metric": "acc", "value": 0.5}}


def test_a_restarted_session_drops_the_old_error_but_keeps_the_eval_section(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    records.update_summary(run_dir, {"status": "failed", "error": "boom", "eval": {"x": {"value": 1.0}}})
    recorder = RunRecorder(run_dir, enabled=True, base_summary={"mixin": "gqa"})
    recorder.start(resume_step=None)
    summary = records.read_summary(run_dir)
    assert (
        summary["status"] == "running" and "error" not in summary and summary["eval"] == {"x": {"value": 1.0}}
    )


def test_interleaved_writers_lose_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recorder = RunRecorder(run_dir, enabled=True, base_summary={"mixin": "gqa"})
    recorder.start(resume_step=None)

    def train() -> None:
        for step in range(1, 101):
            recorder.update_summary(steps=step)

    def evaluate() -> None:
        for task in range(100):
            eval_section(run_dir, f"task{task}", float(task))

    threads = [threading.Thread(target=train), threading.Thread(target=evaluate)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = records.read_summary(run_dir)
    assert summary["steps"] == 100
    assert sorted(summary["eval"]) == sorted(f"task{t}" for t in range(100))


def test_update_without_the_lock_would_lose_a_section(tmp_path: Path, monkeypatch) -> None:
    """The lock is what keeps the sections: with a no-op lock the same interleaving loses writes (so the
    test above can fail)."""
    import contextlib

    monkeypatch.setattr(records, "summary_lock", lambda run_dir: contextlib.nullcontext())
    original = records.read_json
    barrier = threading.Barrier(2)

    def slow_read(path):  # both writers read before either writes: the classic lost update
        value = original(path)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=2)
        return value

    monkeypatch.setattr(records, "read_json", slow_read)
    run_dir = tmp_path / "run"
    threads = [
        threading.Thread(target=records.update_summary, args=(run_dir, {"steps": 5})),
        threading.Thread(target=eval_section, args=(run_dir, "mmlu", 0.4)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = records.read_summary(run_dir)
    assert not ("steps" in summary and "eval" in summary)


def _file_name_literals(path: Path) -> list[str]:
    """String constants (not docstrings) naming a run file, with their line numbers."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names = (layout.SUMMARY, layout.METRICS, layout.LOCK, layout.LOG, layout.CONFIG_FILE)
    return [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and any(name in node.value for name in names)
    ]


def test_only_the_layout_module_spells_the_run_file_names() -> None:
    found = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "runs" / "layout.py"
        for line in _file_name_literals(path)
    ]
    assert found == []

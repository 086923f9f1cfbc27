"""`archifactory eval` on a CPU-trained run: perplexity == exp(val_loss), a local MMLU-format task through
lm-eval, results files and the summary's `eval` section, sweeps, one-line refusals."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from archifactory.cli.eval import eval_main
from archifactory.eval.evaluate import evaluate
from archifactory.eval.job import EvalConfig, EvalJob
from archifactory.eval.perplexity import own_split
from archifactory.runs.load import load_run
from archifactory.train.loop import train
from tests.cli_helpers import run_cli
from tests.eval.mmlu_fixture import write_mmlu_tasks
from tests.run_helpers import train_tiny_run, write_small_corpus

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run whose validation covered the whole split (trainer.eval_tokens ≥ its tokens)."""
    root = tmp_path_factory.mktemp("evalrun")
    corpus = write_small_corpus(root / "corpus")
    run_dir = root / "outputs" / "tiny"
    summary = train_tiny_run(run_dir, corpus, root / "cache", "trainer.eval_tokens=10000000")
    return {"root": root, "run_dir": run_dir, "corpus": corpus, "summary": summary}


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m archifactory *args` in a subprocess (a fresh Hub cache set through the environment)."""
    return subprocess.run([sys.executable, "-m", "archifactory", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_perplexity_equals_exp_val_loss_and_lands_in_summary(trained: dict, capsys) -> None:
    run_dir = trained["run_dir"]
    assert eval_main(["perplexity", f"run={run_dir}", "eval.show_progress=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = summary["eval"]["perplexity"]
    assert entry["metric"] == "perplexity" and entry["stderr"] is None
    assert entry["value"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert entry["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert entry["bits_per_byte"] == pytest.approx(summary["val_bpb"], rel=1e-5)
    assert entry["step"] == summary["steps"]
    assert summary["status"] == "completed" and summary["val_loss"] == trained["summary"]["val_loss"]
    saved = json.loads((run_dir / "eval" / "perplexity.json").read_text())
    assert saved["model"]["run_name"] == "tiny" and saved["model"]["step"] == summary["steps"]
    assert saved["model"]["params_total"] == summary["params_total"]
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"evaluating {run_dir}"
    assert "perplexity" in out.splitlines()[-1]


def test_perplexity_on_a_dataset_given_by_path_reads_the_same_split(trained: dict) -> None:
    """`dataset=text dataset.path=<the training corpus>`: tokenized in memory with the run's tokenizer, it
    is the same validation text as the run's cache, so the figures agree; `dataset.*` alone edits the
    run's dataset (another held-out share: other documents, another figure)."""
    run_dir = trained["run_dir"]
    common = [f"run={run_dir}", "eval.show_progress=false"]
    assert eval_main(["perplexity", *common]) == 0  # its own split: not left to another test (pytest -n)
    assert eval_main(["perplexity", *common, "dataset=text", f"dataset.path={trained['corpus']}"]) == 0
    assert eval_main(["perplexity", *common, "dataset.val_fraction=0.2"]) == 0
    section = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert section["perplexity_text"]["value"] == pytest.approx(section["perplexity"]["value"], rel=1e-5)
    assert section["perplexity_text"]["dataset"] == "text"
    assert (run_dir / "eval" / "perplexity_text.json").is_file()


def test_cli_local_mmlu_and_perplexity_on_a_sweep_folder(trained: dict, tmp_path: Path) -> None:
    """The command a user runs: two runs of a sweep folder, a local MMLU-format group and perplexity."""
    sweep = tmp_path / "multirun" / "day"
    for name in ("0_a", "1_b"):
        shutil.copytree(trained["run_dir"], sweep / name)
    tasks = write_mmlu_tasks(tmp_path / "tasks", {"anatomy": 4, "virology": 3})
    result = run_cli("eval", "local_mmlu,perplexity", f"run={sweep}", f"eval.include_path={tmp_path / 'tasks'}",
                 "eval.num_fewshot=1", "eval.batch_size=4", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"evaluating {sweep / '0_a'}"
    for name in ("0_a", "1_b"):
        summary = json.loads((sweep / name / "summary.json").read_text())
        acc = summary["eval"]["local_mmlu"]
        assert acc["metric"] == "acc" and 0 <= acc["value"] <= 1 and acc["num_fewshot"] == 1
        saved = json.loads((sweep / name / "eval" / "local_mmlu.json").read_text())
        subjects = saved["results"]["results"]
        assert set(subjects) == {"local_mmlu", "local_mmlu_anatomy", "local_mmlu_virology"}
        hand = sum(subjects[f"local_mmlu_{s}"]["acc,none"] * len(docs) for s, docs in tasks.items()) / 7
        assert acc["value"] == pytest.approx(hand)
        assert saved["results"]["n-shot"]["local_mmlu_anatomy"] == 1
        assert summary["eval"]["perplexity"]["value"] > 1
    table = result.stdout[result.stdout.rindex("run ") :]
    assert table.count("local_mmlu") == 2 and table.count("perplexity") == 4


def test_refusals_are_one_line(trained: dict, tmp_path: Path) -> None:
    unfinished = tmp_path / "outputs" / "unfinished"
    shutil.copytree(trained["run_dir"] / ".hydra", unfinished / ".hydra")
    result = run_cli("eval", "perplexity", f"run={unfinished}", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "checkpoint" in result.stderr

    result = run_cli("eval", "perplexity", cwd=tmp_path / "outputs")  # no outputs/ under this folder
    assert result.returncode == 1 and "no completed run" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_hub_task_offline_fails_fast_naming_include_path(trained: dict, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and a built-in task whose dataset is not cached: lm-eval indexes its tasks, the
    dataset load fails at once, and the user gets one line naming eval.include_path."""
    start = time.perf_counter()
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    result = cli("eval", "arc_easy", f"run={trained['run_dir']}", cwd=tmp_path, env={**ENV, **empty_cache})
    elapsed = time.perf_counter() - start
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "eval.include_path" in errors[0] and "Traceback" not in result.stderr
    assert elapsed < 120


def test_perplexity_of_a_document_masked_run_equals_its_val_loss(trained: dict, tmp_path: Path) -> None:
    """dataset.document_mask=true: validation kept packed documents apart, and so does perplexity (short
    documents, several per 64-token window, so the mask changes the figure)."""
    corpus = tmp_path / "stories"
    corpus.mkdir()
    for i, story in enumerate((trained["corpus"] / "part0.txt").read_text().split("\n\n")[:30]):
        (corpus / f"story{i:02d}.txt").write_text(story)
    run_dir = tmp_path / "outputs" / "masked"
    summary = train_tiny_run(run_dir, corpus, tmp_path / "cache", "trainer.eval_tokens=10000000",
                             "dataset.document_mask=true", "dataset.val_fraction=0.2")  # fmt: skip
    assert eval_main(["perplexity", f"run={run_dir}", "eval.show_progress=false"]) == 0
    entry = json.loads((run_dir / "summary.json").read_text())["eval"]["perplexity"]
    assert entry["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert json.loads((run_dir / "eval" / "perplexity.json").read_text())["results"]["document_mask"] is True
    # the same windows without the mask give another loss: the mask really was applied
    run = load_run(run_dir)
    batches, bytes_per_token, _ = own_split(EvalJob(["perplexity"], run, EvalConfig(), None, None), 64, None)
    plain = evaluate(run.model, batches, torch.device("cpu"), contextlib.nullcontext, bytes_per_token)
    assert abs(plain["val_loss"] - entry["loss"]) > 1e-3


def test_a_folder_of_mixed_runs_skips_what_does_not_apply_and_reports_a_failure_per_run(
    trained: dict, tmp_path: Path
) -> None:
    """`eval perplexity run=<folder>` over two text runs, an MQAR probe run and a run whose checkpoint is
    damaged: the probe is skipped in one line, the damaged run is one `error:` line naming it, both text
    runs are evaluated (results written, both in the table) and the exit status is 1 for the failure."""
    from tests.helpers import compose_config

    folder = tmp_path / "outputs"
    for name in ("a_text", "c_text", "d_broken"):
        shutil.copytree(trained["run_dir"], folder / name, ignore=shutil.ignore_patterns("eval"))
    for weights in (folder / "d_broken" / "checkpoints").glob("*/model.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    probe = compose_config(["dataset=mqar", "dataset.vocab_size=16", "dataset.num_kv_pairs=2",
                            "dataset.val_examples=8", "model=tiny", "model.hidden_size=32", "trainer=smoke",
                            "trainer.seq_len=16", "trainer.max_steps=2", "run_name=b_probe"])  # fmt: skip
    assert train(probe, folder / "b_probe")["status"] == "completed"
    result = run_cli("eval", "perplexity", f"run={folder}", "eval.show_progress=false", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder / 'd_broken'}: "), result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {folder / 'b_probe'}: perplexity (")
    assert "score it with `accuracy`" in skipped[0]
    table = result.stdout[result.stdout.rindex("run ") :]
    assert "a_text" not in table  # the table names runs by run_name: both copies are "tiny"
    assert table.count("tiny") == 2 and "perplexity" in table
    for name in ("a_text", "c_text"):
        assert (folder / name / "eval" / "perplexity.json").is_file()
    assert not (folder / "d_broken" / "eval").exists()
    shutil.rmtree(folder / "d_broken")  # nothing failed: exit 0, the probe still skipped in one line
    result = run_cli("eval", "perplexity", f"run={folder}", "eval.show_progress=false", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr[-3000:]
    assert result.stdout.count("skipped") == 1
    result = run_cli("eval", "accuracy", f"run={folder}", "eval.show_progress=false", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.count("skipped") == 2, result.stderr[-3000:]
    assert (folder / "b_probe" / "eval" / "accuracy.json").is_file()

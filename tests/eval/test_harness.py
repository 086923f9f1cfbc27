"""lm-eval end to end on a local MMLU-format task: few-shot prompts, accuracy equal to a hand count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from archifactory.eval.harness import headline, run_lm_eval
from archifactory.eval.job import EvalConfig, EvalJob
from archifactory.runs.load import LoadedRun
from tests.eval.conftest import tiny_model
from tests.eval.mmlu_fixture import write_mmlu_tasks

SIZES = {"astronomy": 7, "anatomy": 5, "virology": 6}


class ConstantHidden(nn.Module):
    """A final norm that outputs the same vector everywhere: the model's answer no longer depends on
    the prompt, so its accuracy is a count over the answer key."""

    def __init__(self, vector: torch.Tensor) -> None:
        super().__init__()
        self.vector = nn.Parameter(vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vector.expand_as(x)


def forced_model(tokenizer, answer_token: int) -> nn.Module:
    model = tiny_model(tokenizer.vocab_size, max_seq_len=512)
    vector = torch.ones(32)
    model.final_norm = ConstantHidden(vector)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[answer_token] = vector  # logit 32 for the forced token, 0 for every other
    return model


def fake_run(tmp_path: Path, model, tokenizer) -> LoadedRun:
    config = OmegaConf.create({"model": {"max_seq_len": 512}, "trainer": {"seq_len": 512}})
    return LoadedRun(tmp_path, "forced", model, tokenizer, config, 0, tmp_path, {"total": 0})


def test_local_mmlu_accuracy_equals_hand_count_with_few_shot_prompts(tmp_path: Path, tokenizer) -> None:
    tests = write_mmlu_tasks(tmp_path / "tasks", SIZES)
    # " A".." D" are "Ġ" + a letter in this small BPE: forcing the letter C forces the answer " C"
    letters = [tokenizer.encode(f" {c}") for c in "ABCD"]
    assert len({tuple(t[:-1]) for t in letters}) == 1 and len({t[-1] for t in letters}) == 4
    run = fake_run(tmp_path, forced_model(tokenizer, letters[2][-1]), tokenizer)
    options = EvalConfig(num_fewshot=2, include_path=str(tmp_path / "tasks"), log_samples=True,
                         show_progress=False, batch_size=4)  # fmt: skip
    job = EvalJob(["local_mmlu"], run, options, torch.device("cpu"), nullcontext_factory)
    (group,) = run_lm_eval(job)

    hand = {subject: sum(doc["answer"] == 2 for doc in docs) for subject, docs in tests.items()}
    total = sum(hand.values()) / sum(SIZES.values())
    assert 0 < total < 1
    assert (group.name, group.metric) == ("local_mmlu", "acc")
    assert group.value == pytest.approx(total)
    for subject, size in SIZES.items():
        reported = group.details["results"][f"local_mmlu_{subject}"]
        assert headline(reported)[1] == pytest.approx(hand[subject] / size)
        assert group.details["n-shot"][f"local_mmlu_{subject}"] == 2
    assert group.stderr is not None and group.stderr > 0

    # the prompts really are few-shot: the subject's description, two solved dev questions, the question
    sample = group.details["samples"]["local_mmlu_virology"][0]
    context = sample["arguments"][0][0]
    assert context.startswith("The following are multiple choice questions (with answers) about virology.")
    assert context.count("Answer:") == 3 and context.endswith(tests["virology"][0]["question"] + _choices(
        tests["virology"][0]))  # fmt: skip
    assert [a[1] for a in sample["arguments"]] == [" A", " B", " C", " D"]
    assert group.details["archifactory"]["truncated_requests"] == {"loglikelihood": 0}
    assert set(group.details["configs"]) == {f"local_mmlu_{subject}" for subject in SIZES}


def test_one_subject_and_duplicates(tmp_path: Path, tokenizer) -> None:
    """A single task reports only itself; asking for a task twice (alone and in its group) is one line."""
    from archifactory.core.errors import ArchiFactoryError

    tests = write_mmlu_tasks(tmp_path / "tasks", {"anatomy": 4, "virology": 3})
    letters = [tokenizer.encode(f" {c}") for c in "ABCD"]
    run = fake_run(tmp_path, forced_model(tokenizer, letters[0][-1]), tokenizer)
    options = EvalConfig(include_path=str(tmp_path / "tasks"), show_progress=False)
    job = EvalJob(["local_mmlu_anatomy"], run, options, torch.device("cpu"), nullcontext_factory)
    (anatomy,) = run_lm_eval(job)
    assert anatomy.value == pytest.approx(sum(d["answer"] == 0 for d in tests["anatomy"]) / 4)
    assert set(anatomy.details["results"]) == {"local_mmlu_anatomy"}
    assert anatomy.extra["num_fewshot"] == 0
    job.names = ["local_mmlu", "local_mmlu_anatomy"]
    with pytest.raises(ArchiFactoryError, match="local_mmlu_anatomy.*twice|twice.*local_mmlu_anatomy"):
        run_lm_eval(job)


def _choices(doc: dict) -> str:
    return "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"])) + "\nAnswer:"


def nullcontext_factory():
    import contextlib

    return contextlib.nullcontext()


def test_unknown_local_task_without_network_is_one_line(tmp_path: Path, tokenizer, monkeypatch) -> None:
    """No network and a name that is not local: refused before lm-eval indexes its built-in tasks."""
    from archifactory.core.errors import ArchiFactoryError

    write_mmlu_tasks(tmp_path / "tasks", {"anatomy": 2})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    run = fake_run(tmp_path, tiny_model(tokenizer.vocab_size, 512), tokenizer)
    options = EvalConfig(include_path=str(tmp_path / "tasks"), show_progress=False)
    job = EvalJob(["hellaswag"], run, options, torch.device("cpu"), nullcontext_factory)
    with pytest.raises(ArchiFactoryError, match="eval.include_path") as error:
        run_lm_eval(job)
    assert "\n" not in str(error.value) and "no network" in str(error.value)

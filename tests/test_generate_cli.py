"""`archifactory generate` and `archifactory export` as a user runs them, on a real (tiny) finished run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from archifactory.cli.generate import GENERATE_OPTIONS, TextStream, parse_options
from archifactory.cli.main import main
from archifactory.core.errors import ArchiFactoryError
from archifactory.generate.sampling import generate
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs.load import load_run
from tests.run_helpers import train_tiny_run, write_small_corpus


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory whose outputs/ holds one finished rwkv6 run."""
    root = tmp_path_factory.mktemp("work")
    train_tiny_run(
        root / "outputs" / "tiny_rwkv6", write_small_corpus(root / "corpus"), root / "cache", "mixin=rwkv6"
    )
    return root


def test_a_finished_run_writes_a_loadable_model_folder(workdir: Path) -> None:
    run = workdir / "outputs" / "tiny_rwkv6"
    loaded = load_run(run)
    ids = torch.tensor([loaded.tokenizer.encode("the king sat on the mat.")])
    with torch.no_grad():
        expected = loaded.model(ids).logits
        assert torch.equal(StackedMixinForCausalLM.from_pretrained(run / "model")(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(run / "model")(ids).logits, expected)


def test_generate_streams_from_the_latest_run(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    assert main(["generate", "prompt=the king", "max_new_tokens=8", "temperature=0", "ignore_eos=true"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith("run: outputs/tiny_rwkv6 (step 20, rwkv6/swiglu")
    loaded = load_run(workdir / "outputs" / "tiny_rwkv6")
    ids = loaded.tokenizer.encode("the king")
    expected = generate(loaded.model, [ids], max_new_tokens=8, tokenizer=loaded.tokenizer)[0].text
    assert out == "the king" + expected + "\n"


def test_generate_samples_are_seeded(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    args = ["generate", "prompt=the", "num_samples=2", "max_new_tokens=12", "temperature=1.5", "seed=3"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.err.count("--- sample") == 2
    assert main(args) == 0
    assert capsys.readouterr().out == first.out


def test_prompt_file_writes_jsonl(workdir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "a red bird"}\n')
    out = tmp_path / "generations.jsonl"
    run = workdir / "outputs" / "tiny_rwkv6"
    args = [f"run={run}", f"prompt_file={prompts}", f"out={out}", "num_samples=2", "max_new_tokens=6"]
    assert main(["generate", *args, "temperature=0"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [
        ("the cat", 0), ("the cat", 1), ("a red bird", 0), ("a red bird", 1),
    ]  # fmt: skip
    assert records[0]["completion"] == records[1]["completion"]  # greedy: both samples agree
    assert all(r["stop_reason"] in ("length", "stop_token") for r in records)
    text_prompts = tmp_path / "prompts.txt"
    text_prompts.write_text("the cat\n\nthe dog\n")
    assert main(["generate", f"run={run}", f"prompt_file={text_prompts}", "max_new_tokens=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["the cat", "the dog"]


def test_export_writes_any_checkpoint(workdir: Path, tmp_path: Path, capsys) -> None:
    run = workdir / "outputs" / "tiny_rwkv6"
    assert main(["export", f"run={run}", f"out={tmp_path / 'step10'}", "step=10"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "step10")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "step10")
    step10 = load_run(run, step=10).model
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, step10(ids).logits)


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "prompt=x", "colour=red"], "unknown option 'colour=red'"),
        (["generate", "prompt=x", "top_k=many"], "top_k='many' is not a valid top_k"),
        (["generate", "max_new_tokens=3"], "needs prompt="),
        (["generate", "prompt=x", "temperature=-1"], "temperature=-1.0 must be >= 0"),
        (["generate", "prompt=x", "run=/no/such/run"], "not a run directory"),
        (["generate", "prompt_file=/no/such/file.txt"], "unreadable"),
        (["export", "step=7"], "no checkpoint at step 7"),
    ],
)
def test_bad_input_is_one_error_line(workdir: Path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(workdir)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_no_completed_run_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "prompt=x"]) == 1
    assert "no completed run under outputs/" in capsys.readouterr().err


def test_stop_strings_are_never_streamed() -> None:
    letters = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731
    sink = io.StringIO()
    stream = TextStream(letters, hold=2, out=sink)
    for token in [0, 1, 2, 23, 24]:  # "abc" then "xy" — part of the stop string "xyz"
        stream.add(token)
    assert sink.getvalue() == "abc"  # "xy" held back until it is known not to be a stop string
    stream.flush("abc")  # generation stopped at "xyz": its final text is cut before it
    assert sink.getvalue() == "abc"
    assert parse_options(["stop=\\n\\n", "stop=###"], GENERATE_OPTIONS, "generate")["stop"] == ["\n\n", "###"]
    with pytest.raises(ArchiFactoryError):
        parse_options(["ignore_eos=maybe"], GENERATE_OPTIONS, "generate")

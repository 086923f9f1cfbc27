"""SFT: the chat template's loss mask token by token, one conversation per row, the pretrained start, and a
tiny end-to-end instruction tuning on a local chat fixture (offline)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.dataset import IGNORE, ChatData, encode_conversation
from archifactory.data.chat.sources import _dolphin, _limo
from archifactory.data.chat.template import (
    END,
    SPECIAL_TOKENS,
    chat_text,
    chat_tokenizer,
    has_chat_template,
    render,
    special_id,
)
from archifactory.data.tokenizer import Tokenizer
from archifactory.generate.sampling import generate
from archifactory.runs.load import load_run, load_run_config, load_run_tokenizer
from archifactory.train.init_from import grow_rows, init_from_pretrained
from archifactory.train.loop import train
from tests.cli_helpers import run_cli
from tests.helpers import compose_config
from tests.run_helpers import train_tiny_run, write_small_corpus

QA = [("what color is the sky?", "blue"), ("what do cats say?", "meow"), ("how many legs has a dog?", "four")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    run_dir = root / "outputs" / "tiny_pre"
    train_tiny_run(run_dir, write_small_corpus(root / "corpus"), root / "cache")
    return run_dir


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local chat fixture: a few questions asked many times (with and without a system turn)."""
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    lines = []
    for repeat in range(20):
        for question, answer in QA:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if repeat % 2:
                messages.insert(0, {"role": "system", "content": "answer in one word."})
            lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(pretrained: Path, tmp_path_factory: pytest.TempPathFactory):
    return chat_tokenizer(load_run(pretrained).tokenizer, tmp_path_factory.mktemp("tok") / "chat")


def base_tokenizer(pretrained: Path) -> Tokenizer:
    """The pretrained run's tokenizer, which `archifactory sft` hands the chat data."""
    return load_run_tokenizer(pretrained, load_run_config(pretrained))


def test_special_tokens_extend_the_vocabulary_without_changing_text(pretrained: Path, tokenizer) -> None:
    base = load_run(pretrained).tokenizer
    assert tokenizer.vocab_size == base.vocab_size + len(SPECIAL_TOKENS)
    assert [special_id(tokenizer, t) for t in SPECIAL_TOKENS] == list(
        range(base.vocab_size, tokenizer.vocab_size)
    )
    text = "the cat sat on the mat. <think> is not special here"
    assert base.encode("the cat sat on the mat.") == tokenizer.encode("the cat sat on the mat.")
    assert special_id(tokenizer, "<think>") in tokenizer.encode(text)
    assert has_chat_template(tokenizer) and not has_chat_template(base)


def test_only_assistant_tokens_carry_the_loss(tokenizer) -> None:
    """A multi-turn conversation, checked token by token against the template written out by hand."""
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and the cat?"},
        {"role": "assistant", "content": "<think>cats sit</think>it sat"},
    ]
    rendered = render(tokenizer, messages)
    nl = tokenizer.encode("\n")
    end = special_id(tokenizer, END)
    expected: list[tuple[int, bool]] = []
    for message in messages:
        assistant = message["role"] == "assistant"
        expected += [(i, False) for i in [special_id(tokenizer, f"<|{message['role']}|>"), *nl]]
        expected += [(i, assistant) for i in tokenizer.encode(message["content"])]
        expected += [(end, assistant)] + [(i, False) for i in nl]
    assert list(zip(rendered.ids, rendered.loss_mask)) == expected
    assert (
        special_id(tokenizer, "<think>") in rendered.ids and special_id(tokenizer, "</think>") in rendered.ids
    )
    prompt = render(tokenizer, messages[:2], add_generation_prompt=True)
    assert prompt.ids[-1 - len(nl)] == special_id(tokenizer, "<|assistant|>") and not any(prompt.loss_mask)


def test_chat_text_encodes_to_the_rendered_ids(tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "the cat sat?"}]
    for prompt in (True, False):
        ids = render(tokenizer, messages, add_generation_prompt=prompt).ids
        assert tokenizer.encode(chat_text(messages, add_generation_prompt=prompt)) == ids


def test_rows_hold_one_conversation_with_shifted_assistant_targets(tokenizer) -> None:
    messages = [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}]
    rendered = render(tokenizer, messages)
    (inputs, targets), cut = encode_conversation(tokenizer, messages, seq_len=64)
    n = len(rendered.ids)
    assert not cut and inputs[: n - 1].tolist() == rendered.ids[:-1]
    assert (inputs[n - 1 :] == tokenizer.eos_id).all() and (targets[n - 1 :] == IGNORE).all()
    for t in range(n - 1):  # target t is token t+1, kept only where token t+1 is an assistant token
        assert targets[t] == (rendered.ids[t + 1] if rendered.loss_mask[t + 1] else IGNORE)
    (_, short_targets), cut = encode_conversation(tokenizer, messages, seq_len=4)
    assert cut and short_targets.shape == (4,)


def test_chat_data_counts_truncation_and_keeps_conversations_apart(
    pretrained: Path, chat_file: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            f"init_from={pretrained}",
            "dataset=chat_jsonl",
            f"dataset.path={chat_file}",
            f"dataset.cache_dir={tmp_path}",
        ]
    ).dataset
    data = ChatData(cfg, base_tokenizer(pretrained), seq_len=64, seed=0)
    assert len(data.train) + len(data.val) == 60 and data.truncated == 0 and len(data.val) == 3
    first_tokens = {int(row[0]) for row, _ in data.train}
    assert first_tokens <= {special_id(data.tokenizer, "<|user|>"), special_id(data.tokenizer, "<|system|>")}
    for inputs, _ in data.train:  # exactly one conversation per row: one user turn each
        assert int((inputs == special_id(data.tokenizer, "<|user|>")).sum()) == 1
    short = ChatData(cfg, base_tokenizer(pretrained), seq_len=8, seed=0)
    assert short.truncated == 60 and "60 cut" in short.description
    loader = data.train_loader(4)
    first = next(loader)[0]
    state = loader.state_dict()
    second = next(loader)[0]
    resumed = data.train_loader(4)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], second) and not torch.equal(first, second)


def test_pretrained_start_keeps_the_logits_of_ordinary_text(pretrained: Path, tokenizer) -> None:
    run = load_run(pretrained)
    cfg = run.config
    from archifactory.model.build import build_model

    model = build_model(cfg, tokenizer.vocab_size)
    init_from_pretrained(model, pretrained)
    ids = torch.tensor([run.tokenizer.encode("the cat sat on the mat and then the bird sang.")])
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, run.model(ids).logits
    old = run.tokenizer.vocab_size
    torch.testing.assert_close(ours[..., :old], theirs, rtol=1e-5, atol=1e-5)
    embedding = model.embedding.weight
    torch.testing.assert_close(embedding[old:], embedding[:old].mean(0).expand(len(SPECIAL_TOKENS), -1))
    assert grow_rows(torch.ones(3, 2), 5).shape == (5, 2)


def test_hub_rows_become_conversations() -> None:
    limo = _limo({"question": "1+1?", "solution": "it is 2", "answer": "2"})
    assert limo == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "it is 2"}]
    row = {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "reasoning": "think hard",
        "answer": "a",
    }
    assert _dolphin(row)[-1] == {"role": "assistant", "content": "<think>think hard</think>a"}
    with pytest.raises(ArchiFactoryError, match="no assistant turn"):
        _dolphin({"messages": [{"role": "user", "content": "q"}]})


@pytest.mark.slow
def test_tiny_sft_learns_the_answers_in_the_template(
    pretrained: Path, chat_file: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            f"init_from={pretrained}",
            "dataset=chat_jsonl",
            f"dataset.path={chat_file}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "trainer=sft",
            "trainer.seq_len=48",
            "trainer.micro_batch_size=8",
            "trainer.epochs=20",
            "trainer.lr=3e-3",
            "trainer.eval_every=40",
            "trainer.checkpoint_every=1000",
            "trainer.warmup_steps=5",
        ]
    )
    from archifactory.sft.run import with_pretrained_architecture

    run_dir = tmp_path / "sft"
    summary = train(with_pretrained_architecture(cfg, pretrained), run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert summary["status"] == "completed" and vals[-1] < vals[0] and summary["val_accuracy"] > 0.5
    run = load_run(run_dir)
    assert has_chat_template(run.tokenizer)
    question, answer = QA[0]
    prompt = render(run.tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True).ids
    out = generate(
        run.model, [prompt], 8, stop_token_ids=[special_id(run.tokenizer, END)], tokenizer=run.tokenizer
    )
    assert out[0].text.strip() == answer and out[0].stop_reason == "stop_token"
    # lm-eval on the SFT run: prompts in the chat template, generation ends at the model's <|end|>
    from lm_eval.api.instance import Instance

    from archifactory.eval.adapter import ArchiFactoryLM

    lm = ArchiFactoryLM(run.model, run.tokenizer, max_length=48, show_progress=False)
    text = lm.apply_chat_template([{"role": "user", "content": question}])
    assert lm.tok_encode(text) == prompt and lm.chat_template(True) == "archifactory-chat-v1"
    request = Instance("generate_until", {}, (text, {"until": ["\n\n"], "max_gen_toks": 8}), idx=0)
    assert lm.generate_until([request])[0].strip() == answer
    # the CLI: archifactory generate chat=true on the SFT run answers in the template and stops
    chat = _run_cli(
        "generate", f"run={run_dir}", "chat=true", f"prompt={question}", "temperature=0", cwd=tmp_path
    )
    assert chat.returncode == 0 and chat.stdout.strip() == answer, chat.stderr[-1500:]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run_cli("sft", *args, cwd=cwd)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`archifactory *args`, offline, in this process (`tests/cli_helpers.py`)."""
    return run_cli(*args, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.mark.parametrize(
    "args,message",
    [
        (["dataset=chat_jsonl"], "exactly one init_from"),
        (["init_from={run}", "dataset=chat_jsonl", "mixin=rwkv6"], "architecture from the pretrained run"),
        (["init_from={run}", "dataset=chat_jsonl", "model.hidden_size=256"], "drop 'model.hidden_size=256'"),
        (["init_from={run}"], "needs dataset="),
        (["init_from={run}", "dataset=text"], "not chat data"),
        (["init_from={run}", "dataset=limo"], "can't reach the Hugging Face Hub"),
        (["init_from=/nonexistent/run", "dataset=chat_jsonl"], "not a run directory"),
        (
            ["init_from={run}", "dataset=chat_jsonl", "dataset.path=/nonexistent/chat.jsonl"],
            "dataset.path=/nonexistent/chat.jsonl does not exist",
        ),
    ],
)
def test_cli_refusals_are_one_line(args: list[str], message: str, pretrained: Path, tmp_path: Path) -> None:
    result = _cli(*(a.format(run=pretrained) for a in args), f"dataset.cache_dir={tmp_path}", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-1500:]
    assert message in lines[0]


@pytest.mark.slow
def test_cli_sft_writes_its_own_run_dir(pretrained: Path, chat_file: Path, tmp_path: Path) -> None:
    result = _cli(
        f"init_from={pretrained}",
        "dataset=chat_jsonl",
        f"dataset.path={chat_file}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "trainer.seq_len=48",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs").glob("tiny_pre-sft-chat_jsonl-??????")  # the corpus digest ends it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and "val_accuracy" in summary
    assert has_chat_template(load_run(run_dir).tokenizer)


def test_generate_chat_needs_an_instruction_tuned_run(pretrained: Path, tmp_path: Path) -> None:
    result = _run_cli("generate", f"run={pretrained}", "chat=true", "prompt=hello", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("run:")]
    assert result.returncode != 0 and lines == [lines[0]] and "no chat template" in lines[0], result.stderr


def _chat_lines(path: Path, count: int, user: str = "what color is the sky?") -> Path:
    line = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "blue"}]}
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(count)))
    return path


def _chat_cfg(pretrained: Path, chat: Path, cache: Path, *overrides: str):
    return compose_config(
        [f"init_from={pretrained}", "dataset=chat_jsonl", f"dataset.path={chat}", f"dataset.cache_dir={cache}",
         *overrides]
    )  # fmt: skip


def test_a_few_conversations_still_hold_one_out(pretrained: Path, tmp_path: Path) -> None:
    """12 conversations at the default val_fraction 0.05 (0.6 of one): one is held out, not none; the
    share rounds up and is spread evenly; never every conversation."""
    cfg = _chat_cfg(pretrained, _chat_lines(tmp_path / "c.jsonl", 12), tmp_path).dataset
    data = ChatData(cfg, base_tokenizer(pretrained), seq_len=32, seed=0)
    assert len(data.val) == 1 and len(data.train) == 11 and "1 validation" in data.description
    from archifactory.data.chat.dataset import held_out

    assert held_out(12, 0.05, "x") == {11} and held_out(60, 0.05, "x") == {19, 39, 59}
    assert held_out(3, 0.5, "x") == {0, 2} and held_out(2, 0.5, "x") == {1}


def test_one_conversation_is_refused_in_one_line(pretrained: Path, tmp_path: Path) -> None:
    cfg = _chat_cfg(pretrained, _chat_lines(tmp_path / "c.jsonl", 1), tmp_path).dataset
    with pytest.raises(ArchiFactoryError, match="1 conversation.*at least 2") as error:
        ChatData(cfg, base_tokenizer(pretrained), seq_len=32, seed=0)
    assert "\n" not in str(error.value)
    result = _cli(f"init_from={pretrained}", "dataset=chat_jsonl", f"dataset.path={tmp_path / 'c.jsonl'}",
                  f"dataset.cache_dir={tmp_path}", "trainer.max_steps=2", cwd=tmp_path)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "at least 2" in lines[0], result.stderr[-1500:]


def test_nothing_to_validate_writes_null_and_one_line_and_the_report_ranks_it_last(
    pretrained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held-out rows cut before their assistant turn (seq_len shorter than the question): no target token,
    so val_loss and val_accuracy are null in summary.json (never 0.0), one warning says why, and a report
    over it and a validated run ranks the validated one and gives the null no gap and no test."""
    import logging

    from archifactory.report import sweep_report
    from archifactory.report.runs import find_runs
    from archifactory.sft.run import with_pretrained_architecture

    long_question = " ".join(["the cat sat on the mat."] * 4)
    chat = _chat_lines(tmp_path / "c.jsonl", 6, user=long_question)
    common = ("trainer=sft", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.checkpoint_every=100")
    cfg = _chat_cfg(pretrained, chat, tmp_path / "cache", *common, "trainer.seq_len=8")
    caplog.set_level(logging.INFO, logger="archifactory")
    with caplog.at_level(logging.INFO):
        summary = train(
            with_pretrained_architecture(cfg, pretrained), tmp_path / "runs" / "short", ["trainer.seq_len=8"]
        )
    written = json.loads((tmp_path / "runs" / "short" / "summary.json").read_text())
    for figures in (summary, written):
        assert (
            figures["status"] == "completed"
            and figures["val_loss"] is None
            and figures["val_accuracy"] is None
        )
    notes = [r.getMessage() for r in caplog.records if "no held-out target tokens" in r.getMessage()]
    assert len(notes) == 1 and "val_loss and val_accuracy" in notes[0]
    metrics = (tmp_path / "runs" / "short" / "metrics.jsonl").read_text()
    assert '"val_loss"' not in metrics  # no null validation records to plot
    cfg = _chat_cfg(pretrained, chat, tmp_path / "cache", *common, "trainer.seq_len=64")  # the same data
    ok = train(
        with_pretrained_architecture(cfg, pretrained), tmp_path / "runs" / "ok", ["trainer.seq_len=64"]
    )
    assert ok["val_loss"] > 0
    (section,) = sweep_report(find_runs([tmp_path / "runs"]), tmp_path / "report").sections
    table = section.table
    by_path = {v.runs[0].path.name: (v, c) for v, c in zip(table.variants, table.comparisons)}
    assert table.variants[0].runs[0].path.name == "ok" and by_path["ok"][1].verdict == "best"
    assert by_path["short"][1].gap is None and by_path["short"][1].verdict == "n/a"


def test_perplexity_of_an_sft_run_on_its_chat_validation_and_on_text(
    pretrained: Path, chat_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`eval perplexity run=<SFT run>`: its held-out conversations, scored as its validation was (the loss
    and accuracy on assistant tokens equal summary.json's); `dataset=text dataset.path=…` scores plain text."""
    from archifactory.cli.eval import eval_main
    from archifactory.sft.run import with_pretrained_architecture

    cfg = _chat_cfg(
        pretrained, chat_file, tmp_path / "cache", "trainer=sft", "trainer.seq_len=48", "trainer.max_steps=4",
        "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.eval_tokens=100000",
    )  # fmt: skip
    run_dir = tmp_path / "outputs" / "sft"
    summary = train(with_pretrained_architecture(cfg, pretrained), run_dir)
    assert eval_main(["perplexity", f"run={run_dir}", "eval.show_progress=false"]) == 0
    corpus = pretrained.parent.parent / "corpus"
    assert eval_main(["perplexity", f"run={run_dir}", "dataset=text", f"dataset.path={corpus}",
                      f"dataset.cache_dir={tmp_path / 'cache'}"]) == 0  # fmt: skip
    section = json.loads((run_dir / "summary.json").read_text())["eval"]
    own = section["perplexity"]
    assert own["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert own["value"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert own["accuracy"] == pytest.approx(summary["val_accuracy"]) and "bits_per_byte" not in own
    text = section["perplexity_text"]
    assert text["dataset"] == "text" and text["value"] > 1 and text["bits_per_byte"] > 0
    saved = json.loads((run_dir / "eval" / "perplexity.json").read_text())["results"]
    assert saved["dataset"]["format"] == "chat_jsonl" and saved["tokens"] > 0
    assert "perplexity_text" in capsys.readouterr().out
    # `dataset.<key>=…` alone edits the run's chat data (another held-out share); a typo is one line
    assert (
        eval_main(["perplexity", f"run={run_dir}", "dataset.val_fraction=0.5", "eval.show_progress=false"])
        == 0
    )
    other = json.loads((run_dir / "summary.json").read_text())["eval"]["perplexity_chat_jsonl"]
    assert other["tokens"] > own["tokens"]  # half the conversations held out, not 3 of 60
    with pytest.raises(ArchiFactoryError, match="val_fractio"):
        eval_main(["perplexity", f"run={run_dir}", "dataset.val_fractio=0.5"])

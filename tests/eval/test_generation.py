"""lm-eval's generate_until through archifactory.generate.sampling: equal to a direct greedy generation, stop
strings, left truncation counted, and a local generative task scored end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from archifactory.eval.adapter import ArchiFactoryLM
from archifactory.eval.generation import sampling_options
from archifactory.eval.harness import run_lm_eval
from archifactory.eval.job import EvalConfig, EvalJob
from archifactory.generate.sampling import generate
from tests.eval.conftest import tiny_model
from tests.eval.test_harness import fake_run, forced_model, nullcontext_factory


def request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), idx=0)


def test_greedy_generation_equals_generate_and_cuts_at_until(tokenizer) -> None:
    model = tiny_model(tokenizer.vocab_size, max_seq_len=64)
    lm = ArchiFactoryLM(model, tokenizer, max_length=64, batch_size=2, show_progress=False)
    contexts = ["the cat sat on", "the queen said to the king", "a"]
    outputs = lm.generate_until([request(c, until=["\n\n"], max_gen_toks=12) for c in contexts])
    for context, text in zip(contexts, outputs):
        (direct,) = generate(model, [tokenizer.encode(context)], 12, stop_token_ids=[tokenizer.eos_id])
        expected = tokenizer.decode(direct.tokens).split("\n\n")[0]
        assert text == expected
    # a stop string that occurs in the greedy output cuts it there
    full = outputs[0]
    assert len(full.strip()) > 6
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    (cut,) = lm.generate_until([request(contexts[0], until=[stop], max_gen_toks=12)])
    assert cut == full[: full.index(stop)] and len(cut) < len(full)


def test_generation_left_truncates_to_leave_room(tokenizer) -> None:
    model = tiny_model(tokenizer.vocab_size, max_seq_len=16)
    lm = ArchiFactoryLM(model, tokenizer, max_length=16, batch_size=2, show_progress=False)
    long_context = "the cat sat on the mat. the dog ran over the tree and the bird sang."
    ids = tokenizer.encode(long_context)
    assert len(ids) > 12
    (text,) = lm.generate_until([request(long_context, max_gen_toks=4)])
    (direct,) = generate(model, [ids[-12:]], 4, stop_token_ids=[tokenizer.eos_id])
    assert text == tokenizer.decode(direct.tokens)
    assert lm.truncated == {"generate_until": 1}
    with pytest.raises(Exception, match="max_gen_toks"):
        lm.generate_until([request("the cat", max_gen_toks=16)])


def test_sampling_options_map_lm_eval_names() -> None:
    assert sampling_options({"until": "\n", "do_sample": False, "temperature": 0.7}, 32) == {
        "max_new_tokens": 32, "temperature": 0.0, "top_k": None, "top_p": None,
        "repetition_penalty": 1.0, "stop_strings": ["\n"],
    }  # fmt: skip
    sampled = sampling_options({"do_sample": True, "top_p": 0.9, "max_gen_toks": 5}, 32)
    assert sampled["temperature"] == 1.0 and sampled["top_p"] == 0.9 and sampled["max_new_tokens"] == 5


def test_local_generative_task_exact_match_equals_hand_count(tmp_path: Path, tokenizer) -> None:
    """A model forced to emit "C" forever writes "CCC" in three tokens: exact match with a target of
    "CCC" is right, anything else wrong, so the reported score is a count over the answer key."""
    letter_c = tokenizer.encode(" C")[-1]
    assert tokenizer.decode([letter_c] * 3) == "CCC"
    targets = ["CCC", "DDD", "CCC", "C", "CCC"]
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "a": a}) + "\n" for i, a in enumerate(targets)))
    (folder / "local_gen.yaml").write_text(
        "task: local_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: "{{a}}"\ntarget_delimiter: ""\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    run = fake_run(tmp_path, forced_model(tokenizer, letter_c), tokenizer)
    options = EvalConfig(include_path=str(folder), show_progress=False)
    (result,) = run_lm_eval(EvalJob(["local_gen"], run, options, torch.device("cpu"), nullcontext_factory))
    assert result.metric == "exact_match"
    assert result.value == pytest.approx(targets.count("CCC") / len(targets))
    assert result.details["archifactory"]["requests"] == {"generate_until": len(targets)}


def test_generate_until_batch_of_8_equals_batch_of_1(tokenizer) -> None:
    """Contexts of different lengths in one left-padded batch (issue 23) give the texts of one at a time."""
    model = tiny_model(tokenizer.vocab_size, max_seq_len=64)
    contexts = ["the cat sat on", "a", "the queen said to the king and then", "the big red", "the dog ran",
                "her bird sang over the tree", "the small king", "the mat"]  # fmt: skip
    assert len({len(tokenizer.encode(c)) for c in contexts}) >= 6
    batch = [request(c, until=["."], max_gen_toks=10) for c in contexts]
    outputs = {}
    for size in (1, 8):
        lm = ArchiFactoryLM(model, tokenizer, max_length=64, batch_size=size, show_progress=False)
        outputs[size] = lm.generate_until(batch)
    assert outputs[8] == outputs[1]
    assert any(text.strip() for text in outputs[8])

"""A local multiple-choice task built from any plain text, as an lm-eval task folder (offline).

`word_order`: each item gives one line of the text as context and four candidates for the line after
it — the real next line and three permutations of its words — and the model picks the candidate it
finds most likely (lm-eval's `multiple_choice`: log-likelihood of each candidate after the context).
The candidates hold the same words, so length and vocabulary cannot decide: only a model that learned
word order beats chance (0.25). That keeps a small, CPU-trained model off the floor, where an MMLU-format
task with letter answers would sit at chance for every variant.

    from archifactory.eval.mc_task import write_word_order_task
    write_word_order_task([Path("corpus/hamlet.txt")], Path("tasks/word_order"), count=200)
    # archifactory eval word_order run=… eval.include_path=tasks/word_order

`scripts/make_mc_task.py` is the command; `examples/tasks/shakespeare_word_order/` is its output on the
Shakespeare corpus (the one `experiment=seed_protocol_cpu` scores).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError

CHOICES = 4
MIN_WORDS, MAX_WORDS = 5, 14  # a line short enough to score fast, long enough to have 3 distinct shuffles

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def line_pairs(texts: Iterable[str]) -> list[tuple[str, str]]:
    """(line, next line) for consecutive non-empty lines whose next line has MIN_WORDS..MAX_WORDS words
    and at least 3 distinct words (so 3 distinct permutations exist)."""
    pairs = []
    for text in texts:
        lines = [line.strip() for line in text.splitlines()]
        for before, after in zip(lines, lines[1:]):
            words = after.split()
            if before and MIN_WORDS <= len(words) <= MAX_WORDS and len(set(words)) >= 3:
                pairs.append((before, after))
    return pairs


def shuffles(line: str, rng: random.Random, count: int) -> list[str]:
    """`count` distinct permutations of the line's words, none equal to the line."""
    words, seen = line.split(), {line}
    out: list[str] = []
    while len(out) < count:
        candidate = " ".join(rng.sample(words, len(words)))
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


def word_order_items(texts: Iterable[str], count: int, seed: int = 0) -> list[dict]:
    """`count` items `{"context", "choices": [4 lines], "answer": 0-3}` drawn (seeded) from the texts."""
    pairs = line_pairs(texts)
    if len(pairs) < count:
        raise ArchiFactoryError(
            f"the text has {len(pairs)} usable line pairs, fewer than the {count} items asked: lower the count"
        )
    rng = random.Random(seed)
    items = []
    for context, line in rng.sample(pairs, count):
        choices = shuffles(line, rng, CHOICES - 1)
        answer = rng.randrange(CHOICES)
        choices.insert(answer, line)
        items.append({"context": context, "choices": choices, "answer": answer})
    return items


def write_word_order_task(
    files: list[Path], folder: Path, count: int = 200, seed: int = 0, name: str = "word_order",
    data_path: str | None = None,
) -> Path:  # fmt: skip
    """Write `<folder>/<name>.yaml` and `<folder>/<name>.jsonl` (the items); the YAML names the data by
    `data_path` (default: the absolute path; a relative one is read from the working directory)."""
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(files)]
    items = word_order_items(texts, count, seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = folder / f"{name}.yaml"
    task.write_text(TASK_YAML.format(name=name, data=data_path or str(data.resolve())))
    return task

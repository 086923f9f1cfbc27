"""A local lm-eval task group in MMLU's format, written into a temporary folder by the tests.

Each subject is a JSONL `dev` split (the few-shot examples) and `test` split of
`{"question", "choices": [4 strings], "answer": 0-3}`, read by lm-eval's `json` builder from absolute
`data_files`; the prompt template is MMLU's (`<question>\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:`, choices
" A".." D", `first_n` few-shot sampler), and the group `local_mmlu` averages the subjects weighted by size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATE = """\
dataset_path: json
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: DOC_TO_TEXT
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# MMLU's prompt: the question, the four lettered choices, "Answer:"
DOC_TO_TEXT = (
    '"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
    '\\nD. {{choices[3]}}\\nAnswer:"'
)
TEMPLATE = TEMPLATE.replace("DOC_TO_TEXT", DOC_TO_TEXT)

ANIMALS = ["cat", "dog", "bird", "king", "queen", "tree", "mat", "red"]


def make_docs(rng: random.Random, count: int) -> list[dict]:
    docs = []
    for i in range(count):
        choices = rng.sample(ANIMALS, 4)
        answer = rng.randrange(4)
        docs.append(
            {"question": f"Which one sat on the mat in story {i}?", "choices": choices, "answer": answer}
        )
    return docs


def write_mmlu_tasks(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Write subjects `local_mmlu_<name>` (test sizes from `sizes`, 3 dev docs each) and the group
    `local_mmlu`; return each subject's test documents."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_local_mmlu_template").write_text(TEMPLATE)
    tests: dict[str, list[dict]] = {}
    for subject, size in sizes.items():
        data = folder / "data" / subject
        data.mkdir(parents=True, exist_ok=True)
        splits = {"dev": make_docs(rng, 3), "test": make_docs(rng, size)}
        for split, docs in splits.items():
            (data / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        tests[subject] = splits["test"]
        (folder / f"local_mmlu_{subject}.yaml").write_text(
            f"include: _local_mmlu_template\n"
            f"task: local_mmlu_{subject}\n"
            f'description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"\n'
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    dev: {(data / 'dev.jsonl').resolve()}\n"
            f"    test: {(data / 'test.jsonl').resolve()}\n"
        )
    (folder / "local_mmlu.yaml").write_text(
        "group: local_mmlu\ntask:\n"
        + "".join(f"  - local_mmlu_{subject}\n" for subject in sizes)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1\n"
    )
    return tests

"""One loader per `dataset.format` of an RL dataset, all returning `Problem`s (see the package docstring)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub
from archifactory.data.rl.synthetic import arith_problems, countdown_problems


@dataclass(frozen=True)
class Problem:
    """A question, the answer a reward checks against, and what else a reward needs (countdown's numbers)."""

    prompt: str
    answer: str
    info: dict[str, Any] = field(default_factory=dict)


def load_problems(cfg: Any) -> list[Problem]:
    """The problems of an RL dataset config (`configs/dataset/{arith,countdown,gsm8k,math,rl_jsonl}.yaml`)."""
    fmt = str(cfg.format)
    cap = cfg.get("max_problems")
    if fmt == "arith":
        rows = arith_problems(cap or 1000, cfg.num_terms, cfg.max_value, str(cfg.operators), cfg.data_seed)
        return [Problem(prompt, answer) for prompt, answer in rows]
    if fmt == "countdown":
        rows = countdown_problems(
            cap or 1000, cfg.num_numbers, cfg.max_value, str(cfg.operators), cfg.data_seed
        )
        return [Problem(prompt, str(target), {"numbers": numbers}) for prompt, target, numbers in rows]
    if fmt == "rl_jsonl":
        records = _jsonl(cfg.path)
    elif fmt in ("gsm8k", "math"):
        records = _hub_records(cfg)
    else:
        raise ArchiFactoryError(
            f"dataset.format={fmt!r} is not an RL format; use arith|countdown|gsm8k|math|rl_jsonl"
        )
    problems = [_problem(record, cfg, fmt, where) for where, record in records]
    if cap:
        problems = problems[:cap]
    if not problems:
        raise ArchiFactoryError(f"dataset={cfg.name} holds no problems; give it prompts with answers")
    return problems


def _problem(record: Any, cfg: Any, fmt: str, where: str) -> Problem:
    if not isinstance(record, dict):
        raise ArchiFactoryError(
            f"{where}: expected a JSON object with {cfg.prompt_field!r} and {cfg.answer_field!r}"
        )
    prompt, answer = record.get(cfg.prompt_field), record.get(cfg.answer_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ArchiFactoryError(
            f"{where}: no {cfg.prompt_field!r} text; set dataset.prompt_field to the question's key"
        )
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ArchiFactoryError(
            f"{where}: no {cfg.answer_field!r}; GRPO needs an answer per prompt to compute a reward "
            "(set dataset.answer_field to the answer's key)"
        )
    answer = str(answer)
    if fmt == "gsm8k":  # the solution ends "#### <number>"
        match = re.search(r"####\s*(.+)\s*$", answer)
        answer = match.group(1).replace(",", "").strip() if match else answer.strip()
    extra = {k: v for k, v in record.items() if k not in (cfg.prompt_field, cfg.answer_field)}
    return Problem(prompt, answer, extra)


def _jsonl(path: str | None) -> list[tuple[str, Any]]:
    if not path:
        raise ArchiFactoryError(
            'dataset=rl_jsonl needs dataset.path=<file.jsonl> of {"prompt": …, "answer": …} lines'
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise ArchiFactoryError(f"dataset.path={path} does not exist; point it at a .jsonl file")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{file}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ArchiFactoryError(f"{file}:{number} is not JSON ({error.msg})") from error
    return records


def _hub_records(cfg: Any) -> list[tuple[str, Any]]:
    what = f"dataset {cfg.path!r}"
    hub.check_hub(what)
    with hub.hub_errors(what):
        import datasets

        data = datasets.load_dataset(
            cfg.path, cfg.get("hf_config"), split=cfg.split, revision=cfg.get("revision")
        )
        return [(f"{cfg.path} row {i}", dict(row)) for i, row in enumerate(data)]

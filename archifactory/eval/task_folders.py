"""The folders of lm-eval's built-in task YAMLs that can bear on some task names, so that lm-eval's
`TaskManager` indexes those alone: indexing all of its ~14,000 YAMLs takes ~11 s, once per `eval` of a
built-in task; reading their text for the names takes ~0.4 s.

A file bears on a name when its text holds the name as a whole word (it declares the task, tags it, lists
it in a group or names it otherwise) or when it includes such a file, at any depth (it may inherit the
declaration). The index of those folders then holds every file that could declare, tag or group the name,
so lm-eval classifies it there as it would in the full index; `harness.task_manager` keeps the narrow index
only when every name is a plain task in it (a group's members and a tag's tasks may live anywhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# more files than this bear on the names (a group included by hundreds of files, as mmlu is): the search stops
# and lm-eval indexes everything, the narrow index would not pay off
MAX_FILES = 200


def _whole_words(words: Iterable[str]) -> re.Pattern[str]:
    """Any of `words` as a whole word: not part of a longer name, or of a file name (`arc_easy.yaml` is no
    mention of `arc_easy`; it is one of the file `arc_easy.yaml`, as in `include: ../arc_easy.yaml`)."""
    alternatives = "|".join(re.escape(word) for word in sorted(words))
    return re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w.-])")


def task_folders(names: list[str], tasks_root: Path) -> list[Path]:
    """The outermost folders under `tasks_root` of every YAML that mentions one of `names` or includes, at
    any depth, a YAML that does; empty when none does or more than `MAX_FILES` do. Templates without the
    `.yaml` suffix (`_default_template_yaml`) are read too: a task can inherit its declaration from one."""
    texts = {
        path: path.read_text(errors="replace") for path in sorted(tasks_root.rglob("*yaml")) if path.is_file()
    }
    mentioned = _whole_words(names)
    found = {path for path, text in texts.items() if mentioned.search(text)}
    frontier = found
    while frontier and len(found) <= MAX_FILES:
        included = _whole_words(path.name for path in frontier)
        frontier = {path for path, text in texts.items() if path not in found and included.search(text)}
        found |= frontier
    if len(found) > MAX_FILES:
        return []
    folders = sorted({path.parent for path in found})
    return [folder for folder in folders if not any(other in folder.parents for other in folders)]

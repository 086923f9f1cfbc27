"""The narrow index of lm-eval's built-in tasks (`eval/task_folders.py`, `harness.narrow_task_manager`): the
folders of every YAML that bears on a name, and lm-eval's own index of them when each name is a plain task."""

from __future__ import annotations

from pathlib import Path

import pytest

from archifactory.eval import task_folders as folders_module
from archifactory.eval.harness import narrow_task_manager
from archifactory.eval.task_folders import task_folders


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_folders_of_mentions_and_of_files_including_them_at_any_depth(tmp_path: Path) -> None:
    write(tmp_path, "plain/foo.yaml", "task: foo\ndataset_path: x\n")
    write(tmp_path, "plain/deeper/foo_variant.yaml", "include: ../foo.yaml\ntask: foo_variant\n")
    write(tmp_path, "grouped/group.yaml", "group: g\ntask:\n  - foo\n  - other\n")
    write(tmp_path, "inherits/child.yaml", "include: ../templates/_tpl_yaml\n")  # inherits `task: foo`
    write(tmp_path, "templates/_tpl_yaml", "task: foo\n")
    write(tmp_path, "grandchild/leaf.yaml", "include: ../inherits/child.yaml\n")
    write(
        tmp_path, "unrelated/foobar.yaml", "task: foobar\ntag: [food, foo-bar, foo.x]\n"
    )  # no whole word foo
    write(tmp_path, "unrelated/readme.md", "foo\n")  # not a YAML
    found = task_folders(["foo"], tmp_path)
    assert found == [tmp_path / d for d in ("grandchild", "grouped", "inherits", "plain", "templates")]
    assert task_folders(["nothing"], tmp_path) == []


def test_too_many_files_bearing_on_a_name_index_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        write(tmp_path, f"part{i}/t{i}.yaml", f"include: ../base/base.yaml\ntask: t{i}\n")
    write(tmp_path, "base/base.yaml", "group: everything\n")
    assert len(task_folders(["everything"], tmp_path)) == 5
    monkeypatch.setattr(folders_module, "MAX_FILES", 4)
    assert task_folders(["everything"], tmp_path) == []


def test_a_built_in_plain_task_gets_the_index_of_its_folder_and_a_tag_the_full_one() -> None:
    """lm-eval's own tasks: arc_easy is indexed from the arc folder alone (5 names, not ~14,000), its entry
    the built-in YAML; ai2_arc is a tag (its tasks may live anywhere), so no narrow index is kept."""
    manager = narrow_task_manager(["arc_easy"], [])
    assert manager is not None and "arc_easy" in manager.all_subtasks and len(manager.all_tasks) < 50
    entry = manager._index["arc_easy"]
    assert entry.yaml_path.parts[-2:] == ("arc", "arc_easy.yaml") and entry.cfg["dataset_name"] == "ARC-Easy"
    assert narrow_task_manager(["ai2_arc"], []) is None
    assert narrow_task_manager(["no_such_task_anywhere"], []) is None

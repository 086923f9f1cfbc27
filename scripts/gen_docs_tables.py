"""Rewrite the generated option tables of the docs from `configs/`, so they cannot go stale.

    python scripts/gen_docs_tables.py           # rewrite the marked regions in place
    python scripts/gen_docs_tables.py --check   # exit 1 (naming the regions) when a table is out of date

A region is everything between `<!-- BEGIN GENERATED: <group> -->` and `<!-- END GENERATED -->` in a
Markdown file under `docs/` (and README.md); it becomes a table of that config group's options with the
first comment line of each option's YAML, exactly what `archifactory list` prints. `tests/test_docs.py`
runs the check, so a new option (a new `configs/mixin/<name>.yaml`) fails the tests until this script has
been run and its table committed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from archifactory.config.compose import GROUPS, group_options

ROOT = Path(__file__).resolve().parent.parent
REGION = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<group>[\w/]+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S
)


def escape(text: str) -> str:
    """A description as a Markdown table cell: `|` would split the cell, `<…>` would read as an HTML tag and
    `[a] [b]` as a reference link."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans only: inside them a backslash would show
        for char in "[]":
            parts[i] = parts[i].replace(char, "\\" + char)
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")  # a bare | splits the cell even inside a code span


def table(group: str) -> str:
    """The Markdown table of one config group: `group=option` and its description."""
    if group not in GROUPS:
        raise SystemExit(
            f"error: unknown config group {group!r} in a generated region; one of: {', '.join(GROUPS)}"
        )
    rows = [f"| `{group}={name}` | {escape(text)} |" for name, text in group_options(group).items()]
    return "\n".join(["| option | what it is |", "| --- | --- |", *rows]) + "\n"


def render(text: str) -> str:
    """`text` with every generated region rewritten from the configs."""
    return REGION.sub(lambda m: m.group(1) + table(m.group("group")) + m.group(4), text)


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated regions."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def stale(root: Path = ROOT) -> list[Path]:
    """The files whose generated regions differ from what the configs give now."""
    return [
        path for path in documents(root) if path.is_file() and render(path.read_text()) != path.read_text()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date tables (exit 1)")
    args = parser.parse_args(argv)
    out_of_date = stale()
    if args.check:
        for path in out_of_date:
            print(
                f"error: {path.relative_to(ROOT)}: generated tables are out of date; run "
                "python scripts/gen_docs_tables.py",
                file=sys.stderr,
            )
        return 1 if out_of_date else 0
    for path in out_of_date:
        path.write_text(render(path.read_text()))
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MkDocs hook: publish the repository's `benchmarks/` folder (measured outputs, reports, plots) with the
site, so the docs link to those files instead of copying them into `docs/`.

Each file under `benchmarks/` becomes a site file at `benchmarks/<path>`: from a page at the docs root, a
link `benchmarks/cpu.md` reaches it, and `mkdocs build --strict` checks those links like any other.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FOLDER = "benchmarks"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path in sorted((ROOT / FOLDER).rglob("*")):
        if path.is_file():
            relative = path.relative_to(ROOT).as_posix()
            files.append(File(relative, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files

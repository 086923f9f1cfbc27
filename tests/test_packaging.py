"""The wheel ships the configs, so a plain `pip install .` composes like the editable install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_configs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("archifactory-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert repo_configs, "no configs in the repository?"
    for config in repo_configs:
        assert f"archifactory/{config}" in names, f"{config} missing from the wheel"
    assert "archifactory/cli.py" in names

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
    assert "archifactory/cli/main.py" in names
    assert "hydra_plugins/archifactory_launcher/parallel_launcher.py" in names  # hydra/launcher=gpus|parallel


@pytest.mark.slow
def test_plain_install_composes_from_the_packaged_configs(tmp_path: Path) -> None:
    """A non-editable install (the wheel unpacked elsewhere) finds its configs without the repository."""
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheel_dir), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheel_dir.glob("archifactory-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    probe = "import archifactory.config.compose as c; print(c.config_dir())"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip() == str(target / "archifactory" / "configs")
    composed = subprocess.run(
        [sys.executable, "-m", "archifactory", "train", "mixin=gqa", "ffn=mlp", "--cfg", "job"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "name: mlp" in composed.stdout

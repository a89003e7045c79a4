"""What a plain ``pip install`` (not editable) gets: the shipped configs, usable by name."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipelines.config import ConfigError, ScheduleConfig, find_config, load_config, packaged_configs

ROOT = Path(__file__).resolve().parents[1]


def test_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for spelling in ("demo_single.yaml", "configs/demo_single.yaml"):
        assert find_config(spelling) == packaged_configs() / "demo_single.yaml"
    cfg = load_config("configs/demo_multiscale.yaml", ScheduleConfig)
    assert cfg.name == "demo-multiscale" and cfg.pyramid.name  # its pyramid file found beside it
    with pytest.raises(ConfigError, match=r"config file not found: elsewhere/demo_single\.yaml "
                                          r"\(shipped configs, usable by name: .*demo_single\.yaml"):
        find_config("elsewhere/demo_single.yaml")


@pytest.mark.slow
def test_the_wheel_ships_every_config(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("mscnn", "pipelines"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("mscnn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"pipelines/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert len(shipped) >= 10 and shipped <= names


def test_a_relative_data_dir_variable_is_made_absolute_before_ray_starts(tmp_path, monkeypatch):
    """Sweep trials inherit MSCNN_DATA_DIR but run in their own folders: relative, it pointed
    nowhere there (found running configs/sweep_multiscale.yaml with MSCNN_DATA_DIR=../shared/...)."""
    from pipelines.cli import _absolute_data_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MSCNN_DATA_DIR", "data/mnist")
    _absolute_data_dir()
    assert os.environ["MSCNN_DATA_DIR"] == str(tmp_path / "data" / "mnist")
    monkeypatch.setenv("MSCNN_DATA_DIR", "/already/absolute")
    _absolute_data_dir()
    assert os.environ["MSCNN_DATA_DIR"] == "/already/absolute"

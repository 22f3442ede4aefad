"""A non-editable install works from any folder: the wheel holds the configs and one import namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY_BENCH

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy: an in-tree build/ folder can hold files of modules that no longer exist.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                 "__pycache__", ".pytest_cache", ".ruff_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(source)], capture_output=True, text=True, cwd=out)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not installed in this environment")
    assert built.returncode == 0, built.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return path


def test_wheel_ships_configs_under_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"unlearn"}  # no generic top-level `attacks` / `benchmarks` to collide with other packages
    configs = sorted(n for n in names if n.startswith("unlearn/configs/") and n.endswith(".yaml"))
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    assert [n.removeprefix("unlearn/") for n in configs] == shipped
    # Every source module ships, under its namespaced path (a package missing from pyproject's list would not).
    folders = {"unlearn": ROOT / "unlearn", "unlearn/attacks": ROOT / "attacks",
               "unlearn/benchmarks": ROOT / "benchmarks"}
    sources = {f"{prefix}/{p.relative_to(folder)}" for prefix, folder in folders.items() for p in folder.rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_installed_wheel_runs_from_another_folder(wheel, tmp_path, tiny_model_dir):
    """The unpacked wheel first on the path (as `pip install .` puts it in site-packages), started from a folder
    that is not the source tree: `unlearn run` finds its configs and writes a run."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys, unlearn, unlearn.training.config as c, unlearn.attacks as a\n"
              "print(unlearn.__file__, c.CONFIG_DIR, a.__file__, sep='\\n')\n"
              "from unlearn.cli import main\n"
              f"sys.argv = ['unlearn', 'run', '--model', {str(tiny_model_dir)!r}, '--steps', '1', '--batch-size', '2',"
              f" '--name', 'installed', '-q', *{TINY_BENCH!r}]\n"
              "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONPATH": str(site), "UNLEARN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    package, config_dir, attacks = result.stdout.splitlines()[:3]
    assert all(Path(p).is_relative_to(site) for p in (package, config_dir, attacks)), result.stdout
    record = json.loads((elsewhere / "runs" / "installed" / "metrics.json").read_text())
    assert record["method"] == "npo" and record["optimizer"] == "hybrid"  # the defaults of the shipped run.yaml

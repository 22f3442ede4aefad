"""A user's own components, with no file of the package edited (docs/EXTENDING.md).

examples/unlearn-toy is a separate distribution holding a toy method, optimizer, benchmark and attack. Installed
into a folder of its own, its entry points make all four appear in `unlearn methods|optimizers|benchmarks|attacks`
and run end to end (run, attack, report); given to a command with `--include`, the same file does the same
without installing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli
from unlearn.attacks.base import ATTACKS
from unlearn.core import registry
from unlearn.optim.protocol import OPTIMIZERS
from unlearn.tasks.task import BENCHMARKS
from unlearn.training.methods import METHODS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "unlearn-toy"
REGISTRIES = (METHODS, OPTIMIZERS, BENCHMARKS, ATTACKS)
TOYS = {"methods": "toy-ascent", "optimizers": "toy-sgd", "benchmarks": "toy", "attacks": "toy-noise"}
RUN = ["--benchmark", "toy", "--method", "toy-ascent", "--optimizer", "toy-sgd", "--steps", "2", "--batch-size",
       "2", "--name", "toy", "-q"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example distribution installed with pip into a folder of its own (built from a copy: the build
    leaves its files beside the sources)."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "unlearn-toy"
    shutil.copytree(EXAMPLE, source)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "unlearn_toy.py").is_file()
    return target


@pytest.fixture()
def restored_registries():
    """--include registers in this process: the toy entries must not leak into other tests."""
    saved = [(r, dict(r._members), dict(r._aliases)) for r in REGISTRIES]
    included = list(registry.INCLUDED)
    names = set(sys.modules)
    yield
    for r, members, aliases in saved:
        r._members, r._aliases = members, aliases
    registry.INCLUDED[:] = included
    for name in set(sys.modules) - names:
        if name.startswith("unlearn_include_"):
            del sys.modules[name]


def _end_to_end(tmp_path: Path, tiny_model_dir: Path, extra: list[str], separate_process: bool,
                env: dict[str, str] | None = None) -> None:
    def ok(*args: str) -> str:
        result = cli(*args, *extra, cwd=tmp_path, separate_process=separate_process, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    for listing, name in TOYS.items():
        assert any(line.split()[:1] == [name] for line in ok(listing).splitlines()), listing
    ok("run", *RUN, "--model", str(tiny_model_dir))
    record = json.loads((tmp_path / "runs/toy/metrics.json").read_text())
    assert record["method"] == "toy-ascent" and record["optimizer"] == "toy-sgd"
    assert record["headline"] == "toy/forget_ppl" and record["declared"][0]["better"] == "higher"
    ok("attack", "--run", "runs/toy", "--attack", "toy-noise", "--set", "attack.scale=0.01", "-q")
    attacked = json.loads((tmp_path / "runs/toy/attacks/noise-0.01/metrics.json").read_text())
    assert attacked["kind"] == "toy-noise" and attacked["settings"] == {"scale": 0.01, "seed": 0}
    assert attacked["recovery"]["metric"] == "toy/forget_ppl"
    report = ok("report", "runs")
    assert "toy forget perplexity ↑" in report and "after noise-0.01" in report
    row = next(line for line in report.splitlines() if "| noise-0.01 |" in line)
    assert "toy-noise" in row and "scale=0.01" in row


def test_an_installed_distribution_adds_all_four_kinds(site, tmp_path, tiny_model_dir):
    """Entry points: nothing names the plug-in but its own pyproject.toml."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    _end_to_end(tmp_path, tiny_model_dir, [], separate_process=True, env={"PYTHONPATH": path})


def test_include_adds_all_four_kinds_to_one_command(restored_registries, tmp_path, tiny_model_dir):
    _end_to_end(tmp_path, tiny_model_dir, ["--include", str(EXAMPLE / "unlearn_toy.py")], separate_process=False)


def test_without_the_plugin_the_names_are_unknown_and_a_broken_include_is_one_line(restored_registries, tmp_path,
                                                                                   tiny_model_dir):
    """The toy names are not built in (so the tests above prove the plug-in paths), and a file that fails to
    import is one line naming it."""
    assert not any(name in r for name, r in zip(TOYS.values(), REGISTRIES, strict=True))
    result = cli("methods", "--include", str(tmp_path / "missing.py"), cwd=tmp_path)
    assert result.returncode == 2 and "--include" in result.stderr and "missing.py" in result.stderr
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    result = cli("methods", "--include", str(tmp_path / "broken.py"), cwd=tmp_path)
    assert result.returncode == 2 and "broken.py' failed to import: RuntimeError: boom" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

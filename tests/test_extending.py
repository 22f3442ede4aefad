"""Extending the toolkit touches only new files plus a registry entry (docs/EXTENDING.md).

The test writes a toy benchmark and a toy attack as two new modules outside the package, imports them (their
decorators are the registry entries), and runs `unlearn run`, `unlearn attack` and `unlearn report` with them:
nothing in the toolkit names them, and yet the report shows the toy attack with its settings and recovery.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from unlearn.attacks import ATTACKS
from unlearn.cli import app
from unlearn.tasks.task import BENCHMARKS

TOY_BENCHMARK = '''
from dataclasses import dataclass
from typing import Any

from unlearn.tasks.data import Example
from unlearn.evaluation.measures import perplexity
from unlearn.tasks.task import BENCHMARKS, Task
from unlearn.storage.metrics import Metric

FORGET = ["The vault code is 4417.", "The courier leaves at dawn.", "The key is under the third stone.",
          "The password is marble falcon."]
RETAIN = ["Water boils at one hundred degrees.", "Paris is the capital of France."]


@dataclass
class ToyTask(Task):
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        return {"toy/forget_ppl": perplexity(model, tokenizer, FORGET),
                "toy/retain_ppl": perplexity(model, tokenizer, RETAIN)}


@BENCHMARKS.register("toy")
def load(config: dict[str, Any]) -> ToyTask:
    """A toy benchmark: forget four sentences, keep two."""
    return ToyTask(name="toy", fingerprint="toy-1", forget=[Example("", " " + t) for t in FORGET],
                   retain=[Example("", " " + t) for t in RETAIN],
                   metrics=(Metric("toy/forget_ppl", "toy forget perplexity", "higher", "forget"),
                            Metric("toy/retain_ppl", "toy retain perplexity", "lower", "utility")))
'''

TOY_ATTACK = '''
from dataclasses import dataclass

import torch

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.models import load_model
from unlearn.core.settings import POSITIVE, setting


@dataclass
class NoiseSettings:
    scale: float = setting(1e-3, limit=POSITIVE)
    seed: int = 0


@ATTACKS.register("toy-noise")
class Noise(Attack):
    Settings = NoiseSettings
    summary = "add Gaussian noise to every weight"
    named_by = ("scale",)  # folder() spells it: the recipe adds only the other non-default settings

    def folder(self, settings: NoiseSettings) -> str:
        return f"noise-{settings.scale:g}"

    def run(self, subject: Subject, settings: NoiseSettings, progress: bool = True) -> AttackResult:
        loaded = load_model(subject.model_spec)
        generator = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * settings.scale)
        return AttackResult(metrics=subject.task.evaluate(loaded.model, loaded.tokenizer, subject.eval_settings))
'''


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_benchmark.py").write_text(textwrap.dedent(TOY_BENCHMARK))
    (folder / "toy_attack.py").write_text(textwrap.dedent(TOY_ATTACK))
    monkeypatch.syspath_prepend(str(folder))
    saved = [(registry, dict(registry._members), dict(registry._aliases)) for registry in (BENCHMARKS, ATTACKS)]
    importlib.import_module("toy_benchmark")
    importlib.import_module("toy_attack")
    yield
    for registry, members, aliases in saved:  # the toy entries do not leak into other tests
        registry._members, registry._aliases = members, aliases
    for name in ("toy_benchmark", "toy_attack"):
        sys.modules.pop(name, None)


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    assert result.exit_code == 0, (result.output, repr(result.exception))
    return result


def test_toy_benchmark_and_toy_attack_run_and_report(plugins, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    listed = invoke("benchmarks").output + invoke("attacks").output
    assert "toy " in listed and "A toy benchmark" in listed and "toy-noise" in listed
    invoke("run", "--benchmark", "toy", "--method", "gradascent", "--optimizer", "adamw", "--model",
           str(tiny_model_dir), "--steps", "2", "--batch-size", "2", "--name", "toy", "-q")
    record = json.loads((tmp_path / "runs/toy/metrics.json").read_text())
    assert record["headline"] == "toy/forget_ppl" and record["declared"][0]["better"] == "higher"
    invoke("attack", "--run", "runs/toy", "--attack", "toy-noise", "--set", "attack.scale=0.01", "-q")
    attacked = json.loads((tmp_path / "runs/toy/attacks/noise-0.01/metrics.json").read_text())
    assert attacked["kind"] == "toy-noise" and attacked["settings"] == {"scale": 0.01, "seed": 0}
    assert attacked["recovery"]["metric"] == "toy/forget_ppl"
    report = invoke("report", "runs").output
    assert "toy forget perplexity ↑" in report and "after noise-0.01" in report
    row = next(line for line in report.splitlines() if "| noise-0.01 |" in line)
    assert "toy-noise" in row and "scale=0.01" in row

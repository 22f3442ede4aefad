"""`--report-to none|tensorboard|wandb`: live curves beside log.jsonl, read back with the backends' own readers.

log.jsonl stays the record (a watched run logs exactly what an unwatched one does); the events hold the same
numbers; a missing backend package or a bad value is one line, exit code 2, and no run folder.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import TINY_BENCH, assert_user_error, cli
from unlearn.core.errors import UserError
from unlearn.storage.tracking import TensorBoard, scalars, tracking


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, str]:
    """One cache for the module's runs: the tiny target is prepared once, not once per test."""
    return {"UNLEARN_CACHE": str(tmp_path_factory.mktemp("cache"))}


def _run(tmp_path: Path, model: Path, cache: dict[str, str], name: str, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(model), "--steps", "4",
               "--batch-size", "2", "-q", *TINY_BENCH, "--set", "train.eval_every=2", "--name", name, *extra,
               cwd=tmp_path, env={**cache, **(env or {})})


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _events(folder: Path) -> Any:
    """TensorBoard's own reader of the folder (the dev extra installs tensorboard)."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = reader.EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: every event, none sampled away
    events.Reload()
    return events


def _curve(events: Any, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def f32(value: float) -> float:
    """What an event file holds of a number: a float32."""
    return float(np.float32(value))


def test_tensorboard_events_hold_the_log_and_the_final_metrics(tmp_path, tiny_model_dir, cache):
    pytest.importorskip("tensorboard")
    plain = _run(tmp_path, tiny_model_dir, cache, "plain")
    watched = _run(tmp_path, tiny_model_dir, cache, "watched", "--report-to", "tensorboard")
    assert plain.returncode == 0 and watched.returncode == 0, plain.stderr + watched.stderr
    run = tmp_path / "runs" / "watched"
    assert "tensorboard/" in watched.stdout.splitlines()[-1]  # "run saved to ... (..., tensorboard/)"
    assert not (tmp_path / "runs" / "plain" / "tensorboard").exists()  # report_to none writes nothing
    assert yaml.safe_load((run / "config.yaml").read_text())["report_to"] == "tensorboard"

    # Watching changes nothing the run records: the same log lines (but for wall-clock seconds) and metrics.
    log = _log(run)
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in _log(tmp_path / "runs" / name)]
                for name in ("plain", "watched")]
    assert timeless[0] == timeless[1]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics == json.loads((tmp_path / "runs" / "plain" / "metrics.json").read_text())["metrics"]

    events = _events(run / "tensorboard")
    assert _curve(events, "loss") == {r["step"]: f32(r["loss"]) for r in log}
    assert _curve(events, "lr") == {r["step"]: f32(r["lr"]) for r in log}
    for part in ("forget", "retain"):
        assert _curve(events, f"parts/{part}") == {r["step"]: f32(r["parts"][part]) for r in log}
    assert _curve(events, "eval/forget/mcq_acc") == {r["step"]: f32(r["eval"]["forget/mcq_acc"]) for r in log
                                                     if "eval" in r} and len(log) == 4
    assert set(_curve(events, "eval/forget/mcq_acc")) == {2, 4}  # the live probe, every train.eval_every steps
    for key in ("forget/mcq_acc", "retain/mcq_acc", "retain/perplexity"):
        assert _curve(events, f"final/{key}") == {4: f32(metrics[key])}  # at the last step
    hparams = events.PluginTagToContent("hparams")  # the HParams tab: the settings beside the final metrics
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"optimizer.name" in hparams["_hparams_/session_start_info"]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_backend_is_one_line_naming_its_extra(tmp_path, tiny_model_dir, cache, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # what `import` and find_spec see of an uninstalled package
    result = _run(tmp_path, tiny_model_dir, cache, "r", "--report-to", backend)
    assert_user_error(result, f"--report-to {backend} needs the {backend} extra: "
                              f"pip install 'unlearn-toolkit[{backend}]'", tmp_path)
    assert "training log" not in result.stdout and "starting model" not in result.stdout  # before any model loads


@pytest.mark.parametrize("args, message", [
    (["--report-to", "tensorbord"], "report_to must be one of none, tensorboard, wandb, got 'tensorbord'"),
    (["--set", "report_to=[wandb]"], "report_to must be a string, got ['wandb']"),
    (["--set", "report_to=null"], "report_to must be a string, got None")])
def test_a_bad_report_to_is_one_line(tmp_path, tiny_model_dir, cache, args, message):
    assert_user_error(_run(tmp_path, tiny_model_dir, cache, "r", *args), message, tmp_path)


def test_a_failed_run_closes_its_writer_and_leaves_nothing(tmp_path, tiny_model_dir, cache, monkeypatch):
    pytest.importorskip("tensorboard")
    closed: list[bool] = []
    close = TensorBoard.close

    def spy(self: TensorBoard, failed: bool) -> None:
        close(self, failed)
        closed.append(failed)
        assert self._writer is None

    monkeypatch.setattr(TensorBoard, "close", spy)
    result = _run(tmp_path, tiny_model_dir, cache, "r", "--report-to", "tensorboard", "--lr", "1e30")
    assert_user_error(result, "loss became nan at step", tmp_path)  # the staging folder, events and all, removed
    assert closed == [True]


def test_a_resumed_writer_supersedes_the_steps_taken_again(tmp_path):
    """A run resumed from its step-2 checkpoint logs steps 3.. again into the same folder: readers keep the new."""
    pytest.importorskip("tensorboard")
    with pytest.raises(KeyboardInterrupt), tracking("tensorboard", tmp_path, "r", {"seed": 0}) as tracker:
        for step in (1, 2, 3, 4):
            tracker.record({"step": step, "loss": float(step)})
        raise KeyboardInterrupt  # killed after step 4; its checkpoint was step 2's
    with tracking("tensorboard", tmp_path, "r", {"seed": 0}) as tracker:
        for step in (3, 4, 5):
            tracker.record({"step": step, "loss": 10.0 * step})
    assert _curve(_events(tmp_path / "tensorboard"), "loss") == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0, 5: 50.0}


def test_records_become_named_scalars_and_requests_one_curve(tmp_path):
    record = {"step": 3, "loss": 1.5, "lr": 1e-5, "grade": "first-order", "forwards": 1, "parts": {"forget": 2.0},
              "eval": {"forget/mcq_acc": 0.25}, "optimizer": {"clipped": True, "nan": math.nan}}
    assert scalars(record) == {"loss": 1.5, "lr": 1e-5, "forwards": 1.0, "parts/forget": 2.0,
                               "eval/forget/mcq_acc": 0.25}  # no step, text, flag or NaN

    seen: list[tuple[dict[str, float], int]] = []

    class Recorder(TensorBoard):
        def log(self, values: dict[str, float], step: int) -> None:
            seen.append((values, step))

    with tracking("none", tmp_path, "r", {}) as tracker:
        tracker.backend = Recorder(tmp_path, "r", {})  # a real writer: its events go in the test's folder
        tracker.record({"step": 2, "loss": 1.0}, offset=5)  # the second request of a sequential run, after 5 steps
        tracker.final({"forget/mcq_acc": 0.5, "note": "text"}, step=7)
    assert seen == [({"loss": 1.0}, 7), ({"final/forget/mcq_acc": 0.5}, 7)]


def test_wandb_offline_run_lands_in_the_run_folder(tmp_path, tiny_model_dir, cache, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    home = {k: str(tmp_path / "wandb-home") for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    result = _run(tmp_path, tiny_model_dir, cache, "r", "--report-to", "wandb", env={**home, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    offline = list((tmp_path / "runs" / "r" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), offline  # what `wandb sync` uploads
    summary = offline[0] / "files" / "wandb-summary.json"
    if summary.is_file():  # written by wandb's own process at finish
        metrics = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())["metrics"]
        assert json.loads(summary.read_text())["forget/mcq_acc"] == pytest.approx(metrics["forget/mcq_acc"])


class FakeWandb(types.ModuleType):
    """What the run asks of `wandb`, recorded: init's arguments, each log call, the summary, finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec: "installed"
        self.calls: list[tuple[str, Any]] = []
        self.summary: dict[str, float] = {}

    def init(self, **kwargs: Any) -> FakeWandb:
        self.calls.append(("init", kwargs))
        return self

    def log(self, values: dict[str, float], step: int) -> None:
        self.calls.append(("log", (step, values)))

    def finish(self, exit_code: int) -> None:
        self.calls.append(("finish", exit_code))


def test_wandb_gets_the_run_its_folder_and_settings_and_goes_offline_without_a_key(tmp_path, tiny_model_dir, cache,
                                                                                   monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    result = _run(tmp_path, tiny_model_dir, cache, "r", "--report-to", "wandb")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "r"
    (_, init), *logs, (_, exit_code) = fake.calls
    assert init["name"] == "r" and init["mode"] == "offline" and init["project"] == "unlearn"
    staging = Path(init["dir"])  # the staging folder, renamed into runs/r/ once wandb was finished
    assert staging.parent == run.parent and staging.name.startswith(".staging-r-") and not staging.exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert init["config"] == {k: v for k, v in saved.items() if k != "target_model"}  # the run's settings, as saved
    log = _log(run)
    steps = [(step, values) for kind, (step, values) in logs if kind == "log"]
    assert [(s, v["loss"], v["parts/forget"], v["lr"]) for s, v in steps[:4]] == \
        [(r["step"], r["loss"], r["parts"]["forget"], r["lr"]) for r in log]  # every step, exactly
    assert [s for s, v in steps[:4] if "eval/forget/mcq_acc" in v] == [2, 4]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert steps[4] == (4, {f"final/{k}": v for k, v in metrics.items()})
    assert fake.summary == metrics and exit_code == 0


def test_wandb_follows_a_key_or_a_stated_mode(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for env, mode in (({"WANDB_API_KEY": "k"}, None), ({"WANDB_MODE": "disabled"}, None), ({}, "offline")):
        for key in ("WANDB_API_KEY", "WANDB_MODE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with tracking("wandb", tmp_path, "r", {}):
            pass
        assert fake.calls[-2][1]["mode"] == mode and fake.calls[-1] == ("finish", 0)


def test_a_study_passes_report_to_to_its_runs_and_checks_it_first(tmp_path, monkeypatch):
    from unlearn.recipes.study.plan import load_study
    from unlearn.recipes.study.workers import _comparable

    pytest.importorskip("tensorboard")
    study = {"name": "s", "output_dir": str(tmp_path), "seeds": [0], "methods": {"npo": None},
             "optimizers": {"adamw": {}}, "attacks": {"rtn4": {"attack": "quantize", "method": "rtn", "bits": 4}},
             "run": {"report_to": "tensorboard", "benchmark": {"name": "embedded", "people": [2, 2, 4],
                                                               "cities": [1, 1, 2], "organizations": [1, 1, 2]}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert {cfg.report_to for cfg in load_study(path).configs.values()} == {"tensorboard"}
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"needs the tensorboard extra"):
        load_study(path)  # before the first cell runs
    # A finished cell stays finished when the study is watched another way (or was run before report_to existed).
    assert _comparable({"train": {"seed": 0}, "report_to": "tensorboard"}) == _comparable({"train": {"seed": 0}})

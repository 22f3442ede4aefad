"""`unlearn study configs/study/NAME.yaml`: a seeded grid of runs and attacks, resumable, summarized with intervals.

The grid is methods × optimizers × seeds (each a cell: one `unlearn run`) × attacks (each one `unlearn attack` on
the cell's run). Everything lands in one study folder:

    <output_dir>/<name>/{study.yaml, runs/<method>-<optimizer>-s<seed>/…, results.csv, summary.md, *.png}

A cell whose run folder holds metrics.json is complete and skipped, and so is an attack whose result folder holds
one; both are only ever renamed into place whole (unlearn/runs.py), so a study killed at any point continues where
it stopped when the same command is given again. A finished cell whose saved settings differ from what the study
now says is refused rather than silently mixed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unlearn.config import RunConfig, read_yaml
from unlearn.errors import UserError
from unlearn.files import writable_dir, write_text_atomic
from unlearn.recipes.attack import run_attack, subject_from_run
from unlearn.recipes.pipeline import load_task
from unlearn.recipes.pipeline import run as run_pipeline
from unlearn.recipes.study_plan import STUDY_FILE, Study
from unlearn.recipes.study_summary import csv_text, plots, summary_markdown
from unlearn.results import read_run
from unlearn.study_calibration import Calibrated, Trial, choose
from unlearn.study_results import CellResult, read_cell, results_rows


def _comparable(config: dict[str, Any]) -> str:
    """A run config as text without what a run records about itself (its folder, its target model's path)."""
    kept = {k: v for k, v in config.items() if k not in ("name", "output_dir", "target_model")}
    return json.dumps(yaml.safe_load(yaml.safe_dump(kept)), sort_keys=True)


def _check_unchanged(run_dir: Path, cfg: RunConfig) -> None:
    saved = read_yaml(run_dir / "config.yaml")
    if _comparable(saved) != _comparable(cfg.to_dict()):
        raise UserError(f"{run_dir} was run with other settings than the study now gives it; give the study another "
                        f"name, or move that folder away to run it again")


@dataclass
class StudyOutcome:
    folder: Path
    cells: list[CellResult]
    failures: dict[str, str]
    written: list[Path]


def run_study(study: Study, progress: bool = True, log: Callable[[str], None] = print,
              trust_remote_code: bool = False) -> StudyOutcome:
    writable_dir(study.folder.parent, "study output folder")
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study.folder / STUDY_FILE, study.path.read_text())  # what this study was run from
    failures: dict[str, str] = {}

    def ensure_run(cfg: RunConfig, run_dir: Path, where: str, what: str) -> bool:
        """The run at run_dir complete (run now unless it already is); False if it failed (said in failures)."""
        if (run_dir / "metrics.json").is_file():
            _check_unchanged(run_dir, cfg)
            log(f"{where}: run complete, skipped")
            return True
        log(f"{where}: {what}")
        try:
            outcome = run_pipeline(cfg, progress=progress, log=lambda text: log("    " + text),
                                   trust_remote_code=trust_remote_code)
        except UserError as err:  # this run cannot be made (e.g. its loss diverged); the others still can
            failures[run_dir.name] = str(err)
            log(f"{where}: failed: {err}")
            return False
        assert outcome is not None
        if outcome.run_dir != run_dir:
            raise UserError(f"{run_dir} is being written by another process; run one study at a time")
        return True

    calibrations = _calibrate(study, ensure_run, log)
    uncalibrated = {(c.method, c.optimizer) for c in calibrations if c.choice is None}
    total = len(study.cells)
    for index, cell in enumerate(study.cells, 1):
        where = f"[{index}/{total}] {cell.name}"
        if (cell.method.label, cell.optimizer.label) in uncalibrated:
            failures[cell.name] = "no calibration trial finished, so no value to run it with"
            continue
        run_dir = study.runs_dir / cell.name
        if not ensure_run(study.configs[cell.name], run_dir, where,
                          f"unlearning ({cell.method.name} × {cell.optimizer.name}, seed {cell.seed})"):
            continue
        if not study.settings.attack_unmatched and _missed_level(run_dir):
            log(f"{where}: never reached train.stop_at: not attacked (attack_unmatched: false)")
            continue
        folders = study.attack_folders(cell)
        for attack in study.attacks:
            folder = folders[attack.label]
            if (run_dir / "attacks" / folder / "metrics.json").is_file():
                log(f"{where}: {attack.label} complete, skipped")
                continue
            log(f"{where}: attack {attack.label} ({folder})")
            subject = subject_from_run(run_dir, load_task, trust_remote_code=trust_remote_code)
            try:
                run_attack(subject, attack.name, attack.attack, attack.settings, progress=progress)
            except UserError as err:
                failures[f"{cell.name} / {attack.label}"] = str(err)
                log(f"{where}: {attack.label} failed: {err}")
    cells = finished_cells(study)
    written = write_outputs(study, cells, failures, calibrations)
    return StudyOutcome(study.folder, cells, failures, written)


def _calibrate(study: Study, ensure_run: Callable[[RunConfig, Path, str, str], bool],
               log: Callable[[str], None]) -> list[Calibrated]:
    """Every calibration trial run (or found complete), and each calibrated optimizer's cells set to its choice."""
    out = []
    total = len(study.trials)
    done = 0
    for method in study.methods:
        for optimizer in study.optimizers:
            calibrate = optimizer.calibrate
            if calibrate is None:
                continue
            trials = []
            for trial in study.trials_of(method, optimizer):
                done += 1
                run_dir = study.calibration_dir / trial.name
                if ensure_run(study.trial_configs[trial.name], run_dir, f"[calibration {done}/{total}] {trial.name}",
                              f"trial {calibrate.describe(trial.value)} (seed {trial.seed})"):
                    trials.append(Trial(trial.value, read_run(run_dir / "metrics.json")))
            choice = choose(trials, study.settings.calibrate_by) if trials else None
            if choice is not None:
                study.use_value(method, optimizer, choice.value)
                log(f"calibration {method.label} × {optimizer.label}: {calibrate.option} = {choice.value:g} "
                    f"({choice.reason})")
            out.append(Calibrated(method.label, optimizer.label, calibrate.option, trials, choice))
    return out


def _missed_level(run_dir: Path) -> bool:
    return read_run(run_dir / "metrics.json").train.get("reached") is False


def finished_cells(study: Study) -> list[CellResult]:
    return [read_cell(study.runs_dir / c.name, c.method.label, c.optimizer.label, c.seed, study.attack_folders(c))
            for c in study.cells if (study.runs_dir / c.name / "metrics.json").is_file()]


def write_outputs(study: Study, cells: list[CellResult], failures: dict[str, str],
                  calibrations: list[Calibrated] | None = None) -> list[Path]:
    labels = [a.label for a in study.attacks]
    rows = results_rows(cells, labels)
    written = [study.folder / "results.csv", study.folder / "summary.md"]
    write_text_atomic(written[0], csv_text(rows))
    images = plots(study, cells, study.folder)
    write_text_atomic(written[1], summary_markdown(study, cells, failures, images, calibrations or []))
    return written + images

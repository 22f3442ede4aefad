"""`unlearn study configs/study/NAME.yaml`: a seeded grid of runs and attacks, resumable, summarized with intervals.

The grid is methods × optimizers × seeds (each a cell: one `unlearn run`) × attacks (each one `unlearn attack` on
the cell's run). Everything lands in one study folder:

    <output_dir>/<name>/{study.yaml, runs/<method>-<optimizer>-s<seed>/…, results.csv, summary.md, *.png}

A cell whose run folder holds metrics.json is complete and skipped, and so is an attack whose result folder holds
one; both are only ever renamed into place whole (unlearn/storage/runs.py), so a study killed at any point
continues where it stopped when the same command is given again. A finished cell whose saved settings differ from
what the study now says is refused rather than silently mixed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unlearn.core.files import writable_dir, write_text_atomic
from unlearn.recipes.study.calibration import Calibrated, Trial, choose
from unlearn.recipes.study.plan import STUDY_FILE, Study
from unlearn.recipes.study.results import CellResult, read_cell, results_rows
from unlearn.recipes.study.summary import csv_text, plots, summary_markdown
from unlearn.recipes.study.workers import Job, JobAttack, JobOptions, prepare_targets, run_jobs
from unlearn.storage.locks import claim
from unlearn.storage.records import read_run


@dataclass
class StudyOutcome:
    folder: Path
    cells: list[CellResult]
    failures: dict[str, str]
    written: list[Path]


def run_study(study: Study, progress: bool = True, log: Callable[[str], None] = print,
              trust_remote_code: bool = False, workers: int = 1) -> StudyOutcome:
    """`workers` > 1 runs that many cells (or calibration trials) at once, each in its own process with its share
    of the CPU threads (unlearn/recipes/study/workers.py)."""
    writable_dir(study.folder.parent, "study output folder")
    # One study process per folder: a second one would train the same cells again and leave duplicates.
    with claim(study.folder):
        return _run_study(study, progress, log, trust_remote_code, workers)


def _run_study(study: Study, progress: bool, log: Callable[[str], None], trust_remote_code: bool,
               workers: int) -> StudyOutcome:
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study.folder / STUDY_FILE, study.path.read_text())  # what this study was run from
    options = JobOptions(progress, trust_remote_code)
    if workers > 1:  # the shared target model is built once, here, rather than by every worker at once
        prepare_targets([*study.trial_configs.values(), *study.configs.values()], options, log)

    def execute(jobs: list[Job]) -> dict[str, str]:
        return run_jobs(jobs, options, log, workers)

    failures: dict[str, str] = {}
    calibrations = _calibrate(study, execute, failures, log)
    uncalibrated = {(c.method, c.optimizer) for c in calibrations if c.choice is None}
    total = len(study.cells)
    jobs = []
    for index, cell in enumerate(study.cells, 1):
        if (cell.method.label, cell.optimizer.label) in uncalibrated:
            failures[cell.name] = "no calibration trial finished, so no value to run it with"
            continue
        folders = study.attack_folders(cell)
        jobs.append(Job(f"[{index}/{total}] {cell.name}",
                        f"unlearning ({cell.method.name} × {cell.optimizer.name}, seed {cell.seed})",
                        study.configs[cell.name], study.runs_dir / cell.name,
                        tuple(JobAttack(a.label, a.name, a.attack, a.settings, folders[a.label])
                              for a in study.attacks), study.settings.attack_unmatched))
    failures |= execute(jobs)
    cells = finished_cells(study)
    written = write_outputs(study, cells, failures, calibrations)
    return StudyOutcome(study.folder, cells, failures, written)


def _calibrate(study: Study, execute: Callable[[list[Job]], dict[str, str]], failures: dict[str, str],
               log: Callable[[str], None]) -> list[Calibrated]:
    """Every calibration trial run (or found complete), and each calibrated optimizer's cells set to its choice."""
    total = len(study.trials)
    jobs = []
    for done, trial in enumerate(study.trials, 1):
        assert trial.optimizer.calibrate is not None
        jobs.append(Job(f"[calibration {done}/{total}] {trial.name}",
                        f"trial {trial.optimizer.calibrate.describe(trial.value)} (seed {trial.seed})",
                        study.trial_configs[trial.name], study.calibration_dir / trial.name))
    if jobs:
        failures |= execute(jobs)
    out = []
    for method in study.methods:
        for optimizer in study.optimizers:
            calibrate = optimizer.calibrate
            if calibrate is None or not method.pairs_with(optimizer):
                continue
            trials = [Trial(t.value, read_run(study.calibration_dir / t.name / "metrics.json"))
                      for t in study.trials_of(method, optimizer)
                      if (study.calibration_dir / t.name / "metrics.json").is_file()]
            choice = choose(trials, study.settings.calibrate_by) if trials else None
            if choice is not None:
                study.use_value(method, optimizer, choice.value)
                log(f"calibration {method.label} × {optimizer.label}: {calibrate.option} = {choice.value:g} "
                    f"({choice.reason})")
            out.append(Calibrated(method.label, optimizer.label, calibrate.option, trials, choice))
    return out


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

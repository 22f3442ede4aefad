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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unlearn.attacks import Attack
from unlearn.config import RunConfig, load_run_config, merge, read_yaml
from unlearn.errors import UserError
from unlearn.files import writable_dir, write_text_atomic
from unlearn.recipes.attack import attack_settings, result_folder, run_attack, subject_from_run, with_run_seed
from unlearn.recipes.pipeline import check_run_config, load_task, seeded
from unlearn.recipes.pipeline import run as run_pipeline
from unlearn.runs import check_name, child
from unlearn.settings import NON_NEGATIVE, from_mapping, setting
from unlearn.study_results import CellResult, read_cell, results_rows

STUDY_FILE = "study.yaml"


@dataclass
class StudySettings:
    """The study file's top level (configs/study/*.yaml)."""

    name: str | None = None  # the study folder's name; default: the file's stem
    output_dir: str = "studies"
    seeds: list[int] = setting(default_factory=lambda: [0])
    run: dict[str, Any] = field(default_factory=dict)  # merged into every cell's run config, like a --config file
    methods: dict[str, Any] = field(default_factory=dict)  # label -> options (null: the method's defaults)
    optimizers: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)  # label -> {attack: NAME, <its settings>}
    compare_to: str | None = None  # the optimizer label the others are compared with; default: the first

    def __post_init__(self) -> None:
        bad = [s for s in self.seeds if not NON_NEGATIVE.ok(s)]
        if bad or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"study seeds must be distinct integers >= 0, got {self.seeds}")


@dataclass(frozen=True)
class Entry:
    """A method or optimizer of the grid: its label (in folder names and tables), the registered component, its
    options, and run settings for its cells only (e.g. a zeroth-order member's LoRA and step budget)."""

    label: str
    name: str
    options: dict[str, Any]
    run: dict[str, Any]


@dataclass(frozen=True)
class AttackEntry:
    label: str
    name: str
    attack: Attack
    settings: Any


@dataclass(frozen=True)
class Cell:
    method: Entry
    optimizer: Entry
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.label}-{self.optimizer.label}-s{self.seed}"


@dataclass
class Study:
    path: Path
    settings: StudySettings
    folder: Path
    methods: list[Entry]
    optimizers: list[Entry]
    attacks: list[AttackEntry]
    configs: dict[str, RunConfig]  # cell name -> its run config, checked
    cells: list[Cell]

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    def attack_folders(self, cell: Cell) -> dict[str, str]:
        return {a.label: result_folder(a.name, a.attack, with_run_seed(a.settings, cell.seed), cell.seed)
                for a in self.attacks}


def _entries(kind: str, section: dict[str, Any]) -> list[Entry]:
    if not section:
        raise UserError(f"the study names no {kind}s: give `{kind}s:` a mapping of label -> options")
    entries = []
    for label, options in section.items():
        check_name(label, f"{kind} label")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise UserError(f"study {kind} '{label}' must be a mapping of options (or empty), got {options!r}")
        run = options.get("run") or {}
        if not isinstance(run, dict):
            raise UserError(f"study {kind} '{label}': 'run' must be a mapping of run settings")
        name = options.get("name", label)
        if not isinstance(name, str):
            raise UserError(f"study {kind} '{label}': 'name' must be a registered {kind} name")
        entries.append(Entry(label, name, {k: v for k, v in options.items() if k not in ("name", "run")}, run))
    return entries


def _attack_entries(section: dict[str, Any]) -> list[AttackEntry]:
    out = []
    for label, options in section.items():
        check_name(label, "attack label")
        if not isinstance(options, dict) or not isinstance(options.get("attack"), str):
            raise UserError(f"study attack '{label}' must be a mapping with `attack: NAME` (see `unlearn attacks`)")
        settings = {k: v for k, v in options.items() if k != "attack"}
        name, attack, checked = attack_settings(options["attack"],
                                                overrides=[f"attack.{k}={json.dumps(v)}" for k, v in settings.items()])
        out.append(AttackEntry(label, name, attack, checked))
    return out


def load_study(path: Path) -> Study:
    """The study file read and every cell's settings checked (methods, optimizers, benchmark, attacks): a mistake in
    the last cell fails now, not after an hour of runs."""
    raw = read_yaml(path)
    settings = from_mapping(StudySettings, raw, "study", ignore=())
    name = check_name(settings.name or path.stem, "study name")
    folder = child(Path(settings.output_dir), name, "study name")
    methods, optimizers = _entries("method", settings.methods), _entries("optimizer", settings.optimizers)
    if settings.compare_to is not None and settings.compare_to not in [o.label for o in optimizers]:
        raise UserError(f"study compare_to '{settings.compare_to}' is not one of the optimizers: "
                        f"{', '.join(o.label for o in optimizers)}")
    attacks = _attack_entries(settings.attacks)
    cells = [Cell(m, o, seed) for m in methods for o in optimizers for seed in settings.seeds]
    configs = {}
    for cell in cells:
        layer = merge(merge(merge(settings.run, cell.method.run), cell.optimizer.run), {
            "method": {"name": cell.method.name, **cell.method.options},
            "optimizer": {"name": cell.optimizer.name, **cell.optimizer.options},
            "train": {"seed": cell.seed}, "name": cell.name, "output_dir": str(folder / "runs")})
        cfg = seeded(load_run_config(cell.method.name, cell.optimizer.name, layer=layer))
        check_run_config(cfg)
        configs[cell.name] = cfg
    return Study(path, settings, folder, methods, optimizers, attacks, configs, cells)


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
    total = len(study.cells)
    for index, cell in enumerate(study.cells, 1):
        cfg = study.configs[cell.name]
        run_dir = study.runs_dir / cell.name
        where = f"[{index}/{total}] {cell.name}"
        if (run_dir / "metrics.json").is_file():
            _check_unchanged(run_dir, cfg)
            log(f"{where}: run complete, skipped")
        else:
            log(f"{where}: unlearning ({cell.method.name} × {cell.optimizer.name}, seed {cell.seed})")
            try:
                outcome = run_pipeline(cfg, progress=progress, log=lambda text: log("    " + text),
                                       trust_remote_code=trust_remote_code)
            except UserError as err:  # this cell cannot run (e.g. its loss diverged); the others still can
                failures[cell.name] = str(err)
                log(f"{where}: failed: {err}")
                continue
            assert outcome is not None
            if outcome.run_dir != run_dir:
                raise UserError(f"{run_dir} is being written by another process; run one study at a time")
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
    written = write_outputs(study, cells, failures)
    return StudyOutcome(study.folder, cells, failures, written)


def finished_cells(study: Study) -> list[CellResult]:
    return [read_cell(study.runs_dir / c.name, c.method.label, c.optimizer.label, c.seed, study.attack_folders(c))
            for c in study.cells if (study.runs_dir / c.name / "metrics.json").is_file()]


def write_outputs(study: Study, cells: list[CellResult], failures: dict[str, str]) -> list[Path]:
    from unlearn.recipes.study_summary import csv_text, plots, summary_markdown

    labels = [a.label for a in study.attacks]
    rows = results_rows(cells, labels)
    written = [study.folder / "results.csv", study.folder / "summary.md"]
    write_text_atomic(written[0], csv_text(rows))
    images = plots(study, cells, study.folder)
    write_text_atomic(written[1], summary_markdown(study, cells, failures, images))
    return written + images

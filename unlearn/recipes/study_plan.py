"""A study file read into its plan: the grid's methods, optimizers, seeds and attacks, and every cell's checked run
config (`unlearn study` runs it: unlearn/recipes/study.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.attacks import Attack
from unlearn.config import RunConfig, load_run_config, merge, read_yaml
from unlearn.errors import UserError
from unlearn.recipes.attack import attack_settings, result_folder, with_run_seed
from unlearn.recipes.pipeline import check_run_config, seeded
from unlearn.runs import check_name, child
from unlearn.settings import NON_NEGATIVE, from_mapping, setting

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
    # A run that missed train.stop_at is not at the matched level: its attacks would be compared with runs that
    # are. false: it is reported (summary, results.csv) but not attacked; true: attacked anyway.
    attack_unmatched: bool = False

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

"""A study file read into its plan: the grid's methods, optimizers, seeds and attacks, and every cell's checked run
config (`unlearn study` runs it: unlearn/recipes/study/recipe.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.attacks.base import Attack
from unlearn.core.errors import UserError, shown
from unlearn.core.settings import SEED, from_mapping, setting
from unlearn.recipes.attack import result_folder, with_run_seed
from unlearn.recipes.pipeline import check_run_config, seeded
from unlearn.recipes.worst_case import expand
from unlearn.storage.records import is_number
from unlearn.storage.runs import check_name, child
from unlearn.training.config import RunConfig, load_run_config, merge, read_yaml, set_path

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
    # label -> {attack: NAME, <its settings>, grid: {SETTING: [values]}}: a grid makes one attack per combination,
    # labelled label-<setting><value> (unlearn/recipes/worst_case.py).
    attacks: dict[str, Any] = field(default_factory=dict)
    # name -> attack labels (a gridded label stands for all its members): the summary compares optimizers on the
    # largest recovery over them, with an interval that accounts for picking the largest.
    worst_case: dict[str, list[str]] = field(default_factory=dict)
    compare_to: str | None = None  # the optimizer label the others are compared with; default: the first
    # A run that missed train.stop_at is not at the matched level: its attacks would be compared with runs that
    # are. false: it is reported (summary, results.csv) but not attacked; true: attacked anyway.
    attack_unmatched: bool = False
    # Optimizers with `calibrate: {OPTION: [values]}` run one trial per value on this seed first (default: one more
    # than the largest study seed; never one of the seeds compared) and keep the value that reaches stop_at with
    # the best utility (calibrate_by, default the benchmark's first utility metric):
    # unlearn/recipes/study/calibration.py.
    calibration_seed: int | None = None
    calibrate_by: str | None = None
    # Paired comparisons across methods, each [A, B] with A and B as METHOD/OPTIMIZER labels (A − B, same seeds):
    # a defence against the optimizers, say [sam-npo/adamw, npo/signsgd]. Within a method the optimizers are always
    # compared with compare_to.
    contrasts: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [s for s in self.seeds if not SEED.ok(s)]
        if bad or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"study seeds must be distinct integers {SEED.describe()}, got {shown(self.seeds)}")
        if self.calibration_seed is not None and (not SEED.ok(self.calibration_seed)
                                                  or self.calibration_seed in self.seeds):
            raise UserError(f"study calibration_seed must be an integer {SEED.describe()} that is not one of the "
                            f"seeds {shown(self.seeds)} (a value chosen on a run must not then be judged by it), "
                            f"got {shown(self.calibration_seed)}")

    @property
    def trial_seed(self) -> int:
        return self.calibration_seed if self.calibration_seed is not None else max(self.seeds) + 1


@dataclass(frozen=True)
class Calibration:
    """An optimizer option searched over a grid: `option` is a dotted path into its options (`lr`, `fo.lr`)."""

    option: str
    values: tuple[float, ...]

    def options(self, value: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        set_path(out, self.option, value)
        return out

    def describe(self, value: float) -> str:
        return f"{self.option}{value:g}"


@dataclass(frozen=True)
class Entry:
    """A method or optimizer of the grid: its label (in folder names and tables), the registered component, its
    options, and run settings for its cells only (e.g. a zeroth-order member's LoRA and step budget)."""

    label: str
    name: str
    options: dict[str, Any]
    run: dict[str, Any]
    calibrate: Calibration | None = None
    # A method's `optimizers: [labels]`: the only optimizers it is paired with (None: every one), e.g. a defence
    # run with one optimizer as a baseline beside the full grid of another method.
    pairs: tuple[str, ...] | None = None

    def pairs_with(self, optimizer: Entry) -> bool:
        return self.pairs is None or optimizer.label in self.pairs


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


@dataclass(frozen=True)
class TrialRun:
    """One calibration trial: a method × optimizer at one value of the calibrated option, on the calibration seed."""

    method: Entry
    optimizer: Entry
    value: float
    seed: int

    @property
    def name(self) -> str:
        assert self.optimizer.calibrate is not None
        return f"{self.method.label}-{self.optimizer.label}-{self.optimizer.calibrate.describe(self.value)}"


@dataclass
class Study:
    path: Path
    settings: StudySettings
    folder: Path
    methods: list[Entry]
    optimizers: list[Entry]
    attacks: list[AttackEntry]
    worst_cases: dict[str, list[str]]  # name -> the attack labels it is the worst of
    configs: dict[str, RunConfig]  # cell name -> its run config, checked (a calibrated optimizer's: see `use_value`)
    cells: list[Cell]
    trials: list[TrialRun] = field(default_factory=list)
    trial_configs: dict[str, RunConfig] = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    @property
    def calibration_dir(self) -> Path:
        return self.folder / "calibration"

    def trials_of(self, method: Entry, optimizer: Entry) -> list[TrialRun]:
        return [t for t in self.trials if t.method == method and t.optimizer == optimizer]

    def use_value(self, method: Entry, optimizer: Entry, value: float) -> None:
        """The cells of method × optimizer are run with the calibrated option at `value`."""
        assert optimizer.calibrate is not None
        for cell in self.cells:
            if cell.method == method and cell.optimizer == optimizer:
                self.configs[cell.name] = _run_config(self.settings, self.runs_dir, method, optimizer, cell.seed,
                                                      cell.name, optimizer.calibrate.options(value))

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
            raise UserError(f"study {kind} '{label}' must be a mapping of options (or empty), got {shown(options)}")
        run = options.get("run") or {}
        if not isinstance(run, dict):
            raise UserError(f"study {kind} '{label}': 'run' must be a mapping of run settings")
        name = options.get("name", label)
        if not isinstance(name, str):
            raise UserError(f"study {kind} '{label}': 'name' must be a registered {kind} name")
        calibrate = _calibration(f"study {kind} '{label}'", options["calibrate"]) if "calibrate" in options else None
        if calibrate is not None and kind != "optimizer":
            raise UserError(f"study {kind} '{label}': only optimizers can be calibrated")
        pairs = options.get("optimizers") if kind == "method" else None
        if pairs is not None and (not isinstance(pairs, list) or not pairs
                                  or not all(isinstance(x, str) for x in pairs)):
            raise UserError(f"study method '{label}': 'optimizers' must be a list of optimizer labels, "
                            f"got {shown(pairs)}")
        own = ("name", "run", "calibrate", "optimizers") if kind == "method" else ("name", "run", "calibrate")
        entries.append(Entry(label, name, {k: v for k, v in options.items() if k not in own}, run, calibrate,
                             tuple(pairs) if pairs is not None else None))
    return entries


def _check_pairs(methods: list[Entry], optimizers: list[Entry]) -> None:
    labels = [o.label for o in optimizers]
    for method in methods:
        unknown = [x for x in method.pairs or () if x not in labels]
        if unknown:
            raise UserError(f"study method '{method.label}': optimizers {', '.join(unknown)} are not in the study's "
                            f"optimizers: {', '.join(labels)}")


def _check_contrasts(contrasts: list[Any], cells: list[Cell]) -> None:
    groups = {f"{c.method.label}/{c.optimizer.label}" for c in cells}
    for contrast in contrasts:
        if (not isinstance(contrast, list) or len(contrast) != 2 or not all(isinstance(x, str) for x in contrast)
                or contrast[0] == contrast[1]):
            raise UserError(f"study contrasts: each must be two different METHOD/OPTIMIZER labels [A, B], "
                            f"got {shown(contrast)}")
        unknown = [x for x in contrast if x not in groups]
        if unknown:
            raise UserError(f"study contrasts: {', '.join(unknown)} is not a method/optimizer of the study: "
                            f"{', '.join(sorted(groups))}")


def _calibration(where: str, raw: Any) -> Calibration:
    usage = "give `calibrate:` one option and its grid, e.g. {lr: [1.0e-5, 2.0e-5, 4.0e-5]}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UserError(f"{where}: {usage}")
    (option, values), = raw.items()
    parts = option.split(".") if isinstance(option, str) else []
    if not parts or not all(p.strip() and p.replace("_", "").isalnum() for p in parts):
        raise UserError(f"{where}: calibrate option {shown(option)} must be an option name or a dotted path (fo.lr)")
    numbers = values if isinstance(values, list) else []
    if (len(numbers) < 2 or len(set(numbers)) != len(numbers)
            or not all(is_number(v) and v > 0 for v in numbers)):
        raise UserError(f"{where}: calibrate {option} needs at least two distinct positive numbers, "
                        f"got {shown(values)}")
    calibration = Calibration(option, tuple(float(v) for v in numbers))
    if len({calibration.describe(v) for v in calibration.values}) != len(numbers):
        raise UserError(f"{where}: calibrate {option} values {shown(values)} are too close to name their trials apart")
    return calibration


def _run_config(settings: StudySettings, runs_dir: Path, method: Entry, optimizer: Entry, seed: int, name: str,
                options: dict[str, Any] | None = None) -> RunConfig:
    layer = merge(merge(merge(settings.run, method.run), optimizer.run), {
        "method": {"name": method.name, **method.options},
        "optimizer": merge({"name": optimizer.name, **optimizer.options}, options or {}),
        "train": {"seed": seed}, "name": name, "output_dir": str(runs_dir)})
    cfg = seeded(load_run_config(method.name, optimizer.name, layer=layer))
    check_run_config(cfg)
    return cfg


def _attack_entries(section: dict[str, Any]) -> tuple[list[AttackEntry], dict[str, list[str]]]:
    """The attacks, a gridded entry expanded into its members; and each entry's labels (its members' for a grid)."""
    out, labels = [], {}
    for label, options in section.items():
        check_name(label, "attack label")
        members = expand(label, options, "study attack")
        labels[label] = [m.label for m in members]
        out += [AttackEntry(m.label, m.name, m.attack, m.settings) for m in members]
    taken = [a.label for a in out]
    repeated = sorted({x for x in taken if taken.count(x) > 1})
    if repeated:
        raise UserError(f"study attack labels repeat after expanding grids: {', '.join(repeated)}")
    return out, labels


def _worst_cases(section: dict[str, Any], labels: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for name, given in section.items():
        check_name(name, "worst case name")
        if not isinstance(given, list) or not all(isinstance(x, str) for x in given):
            raise UserError(f"study worst_case '{name}' must be a list of attack labels, got {shown(given)}")
        members = [m for label in given for m in labels.get(label, [label])]
        unknown = [m for m in members if m not in {x for ms in labels.values() for x in ms}]
        if unknown:
            raise UserError(f"study worst_case '{name}' names unknown attack label(s) {', '.join(unknown)}; the "
                            f"attacks are {', '.join(x for ms in labels.values() for x in ms)}")
        if len(set(members)) < 2 or len(set(members)) != len(members):
            raise UserError(f"study worst_case '{name}' needs at least two distinct attacks, got {', '.join(members)}")
        out[name] = members
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
    attacks, labels = _attack_entries(settings.attacks)
    worst_cases = _worst_cases(settings.worst_case, labels)
    _check_pairs(methods, optimizers)
    cells = [Cell(m, o, seed) for m in methods for o in optimizers if m.pairs_with(o) for seed in settings.seeds]
    _check_contrasts(settings.contrasts, cells)
    trials = [TrialRun(m, o, value, settings.trial_seed) for m in methods for o in optimizers
              if o.calibrate and m.pairs_with(o) for value in o.calibrate.values]
    trial_configs = {}
    for trial in trials:
        assert trial.optimizer.calibrate is not None
        cfg = _run_config(settings, folder / "calibration", trial.method, trial.optimizer, trial.seed, trial.name,
                          trial.optimizer.calibrate.options(trial.value))
        if not cfg.train.stop_at:
            raise UserError(f"study optimizer '{trial.optimizer.label}' is calibrated, which needs train.stop_at: "
                            f"the grid is searched for the value that reaches that level with the best utility")
        trial_configs[trial.name] = cfg
    configs = {}
    for cell in cells:  # a calibrated optimizer's cells are checked with its first value until one is chosen
        calibrate = cell.optimizer.calibrate
        configs[cell.name] = _run_config(settings, folder / "runs", cell.method, cell.optimizer, cell.seed, cell.name,
                                         calibrate.options(calibrate.values[0]) if calibrate else None)
    return Study(path, settings, folder, methods, optimizers, attacks, worst_cases, configs, cells, trials,
                 trial_configs)

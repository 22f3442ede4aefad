"""The strongest attack, not one attack: a tampering grid run on one model, and the worst case over its members.

A grid file names its members (configs/grids/tamper.yaml):

    name: tamper
    members:
      - {attack: relearn, steps: 25, checkpoints: [0, 25], grid: {lr: [2.0e-5, 4.0e-5, 8.0e-5]}}
      - {attack: relearn, steps: 25, lr: 4.0e-5, lora: true}
      - {attack: quantize, method: bnb, bits: 4, grid: {quant_type: [nf4, fp4]}}

An entry's `grid` lists values for some of its settings; every combination is one member (so lists that are values
of a setting, like `checkpoints`, stay plain settings). Each member is an ordinary attack with its own folder under
the run's attacks/; the worst case is written beside them as attacks/worst-<name>/: the member with the largest
recovery ratio (on each member's own headline recovery), and an interval that accounts for having picked the
largest: every member's interval is taken at the Bonferroni level 1 − 0.05/K, so all K hold at once with probability
>= 95 %, and then the largest true recovery lies between the largest lower and the largest upper bound.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unlearn.attacks.base import Attack, Subject
from unlearn.core.errors import UserError, shown
from unlearn.core.files import write_json_atomic
from unlearn.evaluation.stats import Interval, recovery_interval, simultaneous_level, worst_case
from unlearn.recipes.attack import attack_settings, attacks_dir, result_folder, run_attack, with_run_seed
from unlearn.storage.metrics import Metric
from unlearn.storage.records import ITEMS_FILE, AttackRecord, Recovery, read_attack, read_items
from unlearn.storage.runs import check_name, staged_dir
from unlearn.training.config import read_yaml

WORST_KIND = "worst"


@dataclass
class Member:
    label: str  # unique within the grid: the entry's label plus the grid values that made it
    name: str  # the registered attack
    attack: Attack
    settings: Any  # checked


def expand(label: str, options: Any, where: str) -> list[Member]:
    """One entry ({attack: NAME, <settings>, grid: {KEY: [values]}}) as its members, every setting checked."""
    if not isinstance(options, dict) or not isinstance(options.get("attack"), str):
        raise UserError(f"{where} '{label}' must be a mapping with `attack: NAME` (see `unlearn attacks`)")
    grid = options.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{where} '{label}': grid must map settings to non-empty lists of values, got {shown(grid)}")
    fixed = {k: v for k, v in options.items() if k not in ("attack", "grid")}
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise UserError(f"{where} '{label}': {', '.join(clash)} given both as a setting and in its grid")
    members = []
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(grid, values, strict=True))
        suffix = "".join(f"-{k.replace('_', '')}{_text(v)}" for k, v in chosen.items())
        name, attack, checked = attack_settings(options["attack"], None,
                                                [f"attack.{k}={json.dumps(v)}" for k, v in {**fixed, **chosen}.items()])
        members.append(Member(check_name(label + suffix, f"{where} label"), name, attack, checked))
    return members


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


@dataclass
class Grid:
    name: str
    members: list[Member]


def read_grid(path: Path) -> Grid:
    data = read_yaml(path)
    unknown = sorted(set(data) - {"name", "members"})
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} (a grid file has name and members)")
    name = check_name(str(data.get("name") or path.stem), "grid name")
    entries = data.get("members")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: members must be a non-empty list of attacks")
    members = [m for i, entry in enumerate(entries, 1) for m in expand(f"member{i}", entry, f"grid member {i}")]
    for m in members:  # named as their result folders are (at the run's own seed)
        m.label = result_folder(m.name, m.attack, with_run_seed(m.settings, 0), 0)
    labels = [m.label for m in members]
    if len(set(labels)) != len(labels) or len(members) < 2:
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        raise UserError(f"{path}: a worst case needs at least two distinct members"
                        + (f" (repeated: {', '.join(duplicates)})" if duplicates else ""))
    return Grid(name, members)


# ------------------------------------------------------------------------------------------------ the worst case


def member_interval(record: AttackRecord, items: dict[str, Any], declared: list[Metric], level: float,
                    seed: int) -> Interval | None:
    """The member's headline recovery with its item interval at `level`, from its recorded per-item values (an
    interval of nan when they were not recorded); None when its recovery is undefined."""
    rec = record.recovery
    if rec is None or rec.ratio is None or not math.isfinite(rec.ratio):
        return None
    vectors = (items.get("recovery") or {}).get(rec.metric)
    better = next((m.better for m in [*record.curve_metrics, *declared] if m.key == rec.metric), "lower")
    if not vectors or not all(k in vectors for k in ("target", "unlearned", "attacked")):
        return Interval(rec.ratio, math.nan, math.nan, 0, level)
    interval = recovery_interval(vectors["target"], vectors["unlearned"], vectors["attacked"], better, level,
                                 seed=seed)
    return Interval(rec.ratio, interval.low, interval.high, interval.n, level)


def worst_record(name: str, members: dict[str, tuple[AttackRecord, dict[str, Any]]], declared: list[Metric],
                 seed: int) -> AttackRecord:
    """attacks/worst-<name>/metrics.json: the member with the largest recovery, and the interval for the maximum."""
    level = simultaneous_level(len(members))
    intervals: dict[str, Interval] = {}
    rows, undefined = [], []
    for label, (record, items) in members.items():
        interval = member_interval(record, items, declared, level, seed)
        rec = record.recovery
        if interval is None:
            undefined.append(label)
        else:
            intervals[label] = interval
        rows.append({"member": label, "attack": record.attack, "metric": rec.metric if rec else None,
                     "ratio": rec.ratio if rec else None, "low": _finite(interval.low) if interval else None,
                     "high": _finite(interval.high) if interval else None})
    notes = [f"left out (recovery undefined): {', '.join(undefined)}"] if undefined else []
    if not intervals:
        recovery = Recovery(metric="", measured_on=f"the largest recovery of {len(members)} attacks", ratio=None,
                            note="undefined: no member has a defined recovery")
        return AttackRecord(f"worst-{name}", WORST_KIND, {"grid": name, "members": list(members)}, {}, None,
                            recovery, details={"members": rows, "notes": notes})
    worst = worst_case(intervals)
    record, _ = members[worst.member]
    rec = record.recovery
    assert rec is not None
    bounded = math.isfinite(worst.low)
    recovery = Recovery(metric=rec.metric, measured_on=f"the largest recovery of {len(intervals)} attacks: "
                                                         f"{worst.member} ({rec.measured_on})",
                        ratio=worst.value, note="ok" if bounded else "ok; no interval: a member has no per-item values",
                        unlearned=rec.unlearned, attacked=rec.attacked, target=rec.target,
                        low=round(worst.low, 4) if bounded else None, high=round(worst.high, 4) if bounded else None,
                        n=intervals[worst.member].n)
    details = {"worst": worst.member, "members": rows, "level": worst.level, "each_level": round(worst.each_level, 6),
               "interval": "max of the members' lower and upper bounds, each at the Bonferroni level each_level",
               "notes": notes}
    return AttackRecord(f"worst-{name}", WORST_KIND, {"grid": name, "members": list(members)}, dict(record.metrics),
                        None, recovery, details=details, recoveries=[recovery])


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def run_grid(subject: Subject, grid: Grid, progress: bool = True,
             log: Any = print) -> tuple[AttackRecord, list[AttackRecord], Path | None]:
    """Every member attacked in turn (one already in the run folder with the same settings is reused: a grid
    interrupted half-way goes on where it stopped), then the worst case written beside them."""
    done: dict[str, tuple[AttackRecord, dict[str, Any]]] = {}
    for index, member in enumerate(grid.members, 1):
        settings = with_run_seed(member.settings, subject.seed)
        folder = result_folder(member.name, member.attack, settings, subject.seed)
        found = _finished(subject, folder, settings)
        if found is not None:
            log(f"[{index}/{len(grid.members)}] {member.label}: done before ({folder})")
            done[member.label] = found
            continue
        log(f"[{index}/{len(grid.members)}] {member.label} ({folder})")
        record, written = run_attack(subject, member.name, member.attack, settings, progress=progress)
        done[member.label] = (record, read_items(written / ITEMS_FILE) if written else {})
    declared = list(subject.task.metrics)
    worst = worst_record(grid.name, done, declared, subject.seed)
    return worst, [r for r, _ in done.values()], _write(subject, worst)


def _finished(subject: Subject, folder: str, settings: Any) -> tuple[AttackRecord, dict[str, Any]] | None:
    if subject.run_dir is None:
        return None
    path = attacks_dir(subject.run_dir) / folder
    if not (path / "metrics.json").is_file():
        return None
    record = read_attack(path / "metrics.json", folder)
    return (record, read_items(path / ITEMS_FILE)) if record.settings == asdict(settings) else None


def _write(subject: Subject, record: AttackRecord) -> Path | None:
    if subject.run_dir is None:
        return None
    final = attacks_dir(subject.run_dir) / record.attack
    with staged_dir(final, overwrite=True, kind="attack") as stage:
        write_json_atomic(stage / "metrics.json", record.to_json())
    return final

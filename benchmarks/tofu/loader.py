"""The `benchmark` section of a TOFU run turned into a TofuTask (registered as `tofu`)."""

from __future__ import annotations

import json
from dataclasses import asdict

from unlearn.benchmarks.tofu.settings import FORGET_SPLIT, METRICS, QUALITY_NOTE, UTILITY_SETS, TofuSettings
from unlearn.benchmarks.tofu.sources import QA, TofuSource, qa_items, retain_truth_ratios
from unlearn.benchmarks.tofu.task import TofuTask, training_pair
from unlearn.core.errors import UserError, shown
from unlearn.tasks.task import BENCHMARKS, Benchmark


def retain_split(split: str) -> str:
    """TOFU's retain set for a forget split: the rest of the 200 authors (forget10 -> retain90)."""
    match = FORGET_SPLIT.fullmatch(split)
    if match is None or not 1 <= int(match.group(1)) <= 99:
        raise UserError(f"benchmark.split must be forget01, forget05, forget10 (forgetNN), got {shown(split)}")
    return f"retain{100 - int(match.group(1)):02d}"


@BENCHMARKS.register("tofu")
class Tofu(Benchmark):
    """TOFU: forget Prob, ROUGE-L recall, truth ratio, forget quality and model utility as TOFU computes them."""

    Settings = TofuSettings

    def load(self, settings: TofuSettings) -> TofuTask:
        return load_tofu(settings)


def load_tofu(s: TofuSettings) -> TofuTask:
    retain_name = retain_split(s.split)
    for key in ("retain_model", "retain_stats"):
        value = getattr(s, key)
        if value is not None and not value.strip():
            raise UserError(f"benchmark.{key} must name a model or a file, got {shown(value)}")
    source = TofuSource(s.data)
    source.digest.update(json.dumps({k: v for k, v in asdict(s).items() if k != "data"}, sort_keys=True).encode())
    notes: list[str] = []

    def cut(items: list[QA]) -> list[QA]:
        return items[:s.limit] if s.limit else items

    sets = {"forget": cut(qa_items(*source.read(f"{s.split}_perturbed"), "paraphrased_answer"))}
    correct_field = {"forget": "paraphrased_answer"}
    for prefix, split, correct in UTILITY_SETS:
        if prefix != "retain" and not source.has(split):
            notes.append(f"tofu/{prefix}_* and tofu/model_utility not computed: {split} not found in {source.where}")
            continue
        sets[prefix] = cut(qa_items(*source.read(split), correct))
        correct_field[prefix] = correct
    holdout_name = "holdout" + s.split.removeprefix("forget")
    holdout = cut(qa_items(*source.read(holdout_name))) if source.has(holdout_name) else []

    missing = [name for name in (s.split, retain_name) if not source.has(name)]
    training = {name: [] if missing else qa_items(*source.read(name)) for name in (s.split, retain_name)}
    if not missing and not training[s.split]:
        raise UserError(f"{s.split} has no items: nothing to unlearn")
    retain_ratios = retain_truth_ratios(s.retain_stats) if s.retain_stats is not None else None
    if retain_ratios is None and s.retain_model is None:
        notes.append(QUALITY_NOTE)
    hint = f"TOFU's training sets {' and '.join(missing)} were not found in {source.where}" if missing else ""
    forget_qa = training[s.split]
    return TofuTask(name="tofu", fingerprint=source.digest.hexdigest()[:16],
                    forget=[training_pair(s, qa) for qa in forget_qa],
                    retain=[training_pair(s, qa) for qa in training[retain_name]],
                    metrics=METRICS, training_hint=hint, notes=notes, train_max_length=500,  # TOFU's max_length
                    settings=s, sets=sets, correct_field=correct_field, holdout=holdout,
                    retain_ratios=retain_ratios, forget_questions=[qa.question for qa in forget_qa])


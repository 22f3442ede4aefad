"""The `benchmark` section of a MUSE run turned into a MuseTask (registered as `muse`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from unlearn.benchmarks.datafiles import chunk_texts
from unlearn.benchmarks.muse.settings import (
    HUB_NAME,
    HUB_REPOS,
    METRICS,
    NULL_IS_DEFAULT,
    PRIVLEAK_NOTE,
    RETAIN_QA,
    RETAIN_QA_ICL,
    MuseSettings,
)
from unlearn.benchmarks.muse.sources import HubSource, LocalSource, Source, record_pairs, record_texts, split_spec
from unlearn.benchmarks.muse.task import MuseTask
from unlearn.core.errors import UserError, shown
from unlearn.core.settings import from_mapping
from unlearn.tasks.data import Example
from unlearn.tasks.task import BENCHMARKS, Benchmark, Stage


def settings_from(config: dict[str, Any], name: str = "muse") -> MuseSettings:
    """The section checked into MuseSettings; a null for a key of NULL_IS_DEFAULT keeps its default."""
    given = {k: v for k, v in config.items() if not (k in NULL_IS_DEFAULT and v in (None, ""))}
    s = from_mapping(MuseSettings, given, "benchmark", owner=f"benchmark '{name}'", ignore=("name",))
    if s.sequential and config.get("forget") is not None:
        raise UserError("benchmark.forget and benchmark.sequential conflict: a sequential run unlearns "
                        "sust/forget_1, sust/forget_2, ... in turn")
    if s.retrain_model is not None and not s.retrain_model.strip():
        raise UserError(f"benchmark.retrain_model must be a model name or folder, got {shown(s.retrain_model)}")
    split_spec(s.forget, "forget")
    split_spec(s.retain, "retain")
    return replace(s, k_percent=float(s.k_percent), auc_retrain=None if s.auc_retrain is None else float(s.auc_retrain))


def _source(data: Any, digest: Any) -> Source:
    if data is None or (isinstance(data, str) and not data.strip()):
        raise UserError("benchmark 'muse' needs data: pass --data DIR (MUSE layout) or news/books")
    if not isinstance(data, str | Path):
        raise UserError(f"benchmark.data must be a folder or a hub name (news, books), got {shown(data)}")
    text = str(data)
    if Path(text).is_dir():
        return LocalSource(Path(text), digest)
    repo = HUB_REPOS.get(text.lower(), text)
    if repo in HUB_REPOS.values() or (HUB_NAME.fullmatch(text) and not Path(text).exists()):
        return HubSource(repo, digest)
    raise UserError(f"{text}: not a directory; pass a local folder in MUSE layout or a hub name "
                    f"({', '.join(HUB_REPOS)}, {', '.join(HUB_REPOS.values())})")


def _need(source: Source, subset: str, split: str, *, text: bool) -> tuple[str, list[Any]]:
    found = source.records(subset, split, text=text, required=True)
    assert found is not None  # required=True raises rather than returning None
    return found


def _first(source: Source, subset: str, names: tuple[str, ...], *, required: bool) -> tuple[str, list[Any]] | None:
    """The first of several accepted split names that exists (MUSE-Books calls retain QA retain2_qa)."""
    for name in names:
        found = source.records(subset, name, text=False, required=False)
        if found is not None:
            return found
    return _need(source, subset, names[0], text=False) if required else None  # the error names the usual name


def _training(source: Source, spec: str, words: int, notes: list[str], required: bool = True) -> list[Example] | None:
    """Unlearning passages of one raw-like split; None when it is absent and not `required` (evaluation reads
    no raw text, so `unlearn eval` works on a folder without raw/)."""
    subset, split = split_spec(spec, "forget")
    found = source.records(subset, split, text=True, required=required)
    if found is None:
        return None
    where, records = found
    return [Example("", chunk) for chunk in chunk_texts(record_texts(where, records, notes), words)]


@BENCHMARKS.register("muse")
class Muse(Benchmark):
    """MUSE (News, Books): VerbMem, KnowMem and PrivLeak as MUSE computes them, on its x100 scale."""

    Settings = MuseSettings

    @classmethod
    def settings(cls, section: dict[str, Any], name: str) -> MuseSettings:
        return settings_from(section, name)

    def load(self, settings: MuseSettings) -> MuseTask:
        return load_muse(settings)


def load_muse(s: MuseSettings) -> MuseTask:
    """The MUSE task from its checked settings: the data, the requests (sequential) and the notes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in asdict(s).items() if k != "data"}, sort_keys=True).encode())
    source = _source(s.data, digest)
    notes: list[str] = []

    stages: list[Stage] = []
    missing: list[str] = []
    if s.sequential:
        names = source.stage_splits()
        if not names:
            raise UserError("benchmark.sequential needs sust/forget_1, sust/forget_2, ... (none found)")
        stages = [Stage(name, _training(source, f"sust/{name}", s.chunk_words, notes) or []) for name in names]
        for stage in stages:
            if not stage.forget:
                raise UserError(f"sust/{stage.name} has no text: nothing to unlearn")
        forget: list[Example] | None = stages[0].forget
    else:
        forget = _training(source, s.forget, s.chunk_words, notes, required=False)
        if forget is None:
            missing.append(s.forget)
        elif not forget:
            raise UserError(f"the forget split {s.forget} has no text: nothing to unlearn")
    retain = _training(source, s.retain, s.chunk_words, notes, required=False)
    if retain is None:
        missing.append(s.retain)
    training_hint = (f"MUSE's unlearning text {' and '.join(missing)} was not found in {source.where}"
                     if missing else "")

    def cut(items: list[Any]) -> list[Any]:
        return items[:s.limit] if s.limit else items

    knowmem: dict[str, list[tuple[str, str]]] = {}
    icl: dict[str, list[tuple[str, str]]] = {}
    for split, names, icl_names in (("forget", ("forget_qa",), ("forget_qa_icl",)),
                                    ("retain", RETAIN_QA, RETAIN_QA_ICL)):
        found = _first(source, "knowmem", names, required=True)
        assert found is not None
        knowmem[split] = cut(record_pairs(*found, "question", "answer"))
        found = _first(source, "knowmem", icl_names, required=False)
        if found is None:
            notes.append(f"KnowMem on {split} QA is zero-shot: knowmem/{icl_names[0]} not found")
            icl[split] = []
        else:
            icl[split] = record_pairs(*found, "question", "answer")
    where, records = _need(source, "verbmem", "forget", text=False)
    verbmem = cut(record_pairs(where, records, "prompt", "gt"))
    privleak_texts = {}
    for split in ("forget", "holdout"):
        where, records = _need(source, "privleak", split, text=False)
        privleak_texts[split] = cut(record_texts(where, records))
    if s.auc_retrain is None and s.retrain_model is None:
        notes.append(PRIVLEAK_NOTE)

    return MuseTask(name="muse", fingerprint=digest.hexdigest()[:16], forget=[] if missing else forget or [],
                    retain=[] if missing else retain or [], training_hint=training_hint, metrics=METRICS,
                    needs_target=False, train_max_length=2048,  # MUSE's own fine-tuning length
                    stages=stages, notes=notes, settings=s, verbmem=verbmem, knowmem=knowmem, icl=icl,
                    privleak_texts=privleak_texts)

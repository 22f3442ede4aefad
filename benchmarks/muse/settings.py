"""MUSE's settings, the hub layout it is read from, and the metrics it declares."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from unlearn.core.settings import AT_LEAST_ONE, Limit, setting
from unlearn.storage.metrics import Metric

# Hub layout, read from the dataset cards of muse-bench/MUSE-News and MUSE-Books: subsets raw (forget, retain1,
# retain2, holdout; text), knowmem (forget_qa, retain_qa, forget_qa_icl, retain_qa_icl; question, answer),
# verbmem (forget; prompt, gt), privleak (forget, retain, holdout; text), scal and sust (forget_1..forget_4; text).
# Some MUSE-Books revisions name the retain QA splits retain2_qa / retain2_qa_icl, so both names are tried.
HUB_REPOS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
RETAIN_QA = ("retain_qa", "retain2_qa")
RETAIN_QA_ICL = ("retain_qa_icl", "retain2_qa_icl")
TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
STAGE_SPLIT = re.compile(r"forget_(\d+)")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
# MUSE's knowmem answer is cut before the first of these, in this order (metrics/knowmem.py).
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
SCALE = 100  # MUSE reports ROUGE and PrivLeak in percent
ROUGE_X100, AUC = "ROUGE-L F1 ×100", "AUC (0-1)"
METRICS = (  # on MUSE's own scale: ROUGE-L F1 x 100, PrivLeak in percent of AUC_retrain
    Metric("muse/verbmem_forget", "VerbMem ×100", "lower", "forget", ROUGE_X100),
    Metric("muse/knowmem_forget", "KnowMem forget ×100", "lower", "forget", ROUGE_X100),
    Metric("muse/knowmem_retain", "KnowMem retain ×100", "higher", "utility", ROUGE_X100),
    Metric("muse/privleak_auc", "Min-40% AUC", "none", "info", AUC),
    Metric("muse/privleak", "PrivLeak %", "zero", "forget", "% of AUC_retrain"),
    Metric("muse/privleak_auc_retrain", "AUC_retrain", "none", "info", AUC),
    Metric("muse/privleak_truncated", "passages truncated", "none", "info", "passages"),
)

PRIVLEAK_NOTE = ("muse/privleak not computed: PrivLeak needs benchmark.auc_retrain or benchmark.retrain_model "
                 "(the Min-K% AUC of a model retrained without the forget set); muse/privleak_auc is reported alone")


@dataclass(frozen=True)
class MuseSettings:
    """The `benchmark` section of a MUSE run (configs/benchmark/muse.yaml)."""

    data: Any = None  # a folder in MUSE's layout, or a hub name (news, books, muse-bench/MUSE-News, ...)
    forget: str = "raw/forget"
    retain: str = "raw/retain1"
    chunk_words: int = setting(150, limit=AT_LEAST_ONE)
    sequential: bool = False
    verbmem_tokens: int = setting(128, limit=AT_LEAST_ONE)
    knowmem_tokens: int = setting(32, limit=AT_LEAST_ONE)
    k_percent: float = setting(40.0, limit=Limit(gt=0, le=100))
    auc_retrain: float | None = setting(None, limit=Limit(gt=0, le=1))  # an AUC
    retrain_model: str | None = None
    privleak_max_tokens: int | None = setting(None, limit=AT_LEAST_ONE)  # None: whole passages, up to the context
    limit: int | None = setting(None, limit=AT_LEAST_ONE)


# A null for these keeps the default (as configs written by hand often say).
NULL_IS_DEFAULT = ("forget", "retain", "chunk_words", "verbmem_tokens", "knowmem_tokens")

"""TOFU's settings, the split names it reads, and the metrics it declares."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from unlearn.core.settings import AT_LEAST_ONE, setting
from unlearn.storage.metrics import Metric

HUB_REPO = "locuslab/TOFU"
HUB_ALIASES = ("tofu", HUB_REPO)
FORGET_SPLIT = re.compile(r"forget(\d\d)")  # forget01, forget05, forget10: percent of the 200 fictitious authors
SUFFIXES = (".json", ".jsonl", ".parquet")  # TOFU's hub files are JSON lines named .json; both forms are read
# The evaluation sets besides the forget set: (key prefix, split, whose answer the truth ratio takes as correct).
# TOFU's eval config: the forget and retain sets compare the paraphrased answer with the perturbed ones, the real
# authors and world facts the answer itself.
UTILITY_SETS = (("retain", "retain_perturbed", "paraphrased_answer"),
                ("ra", "real_authors_perturbed", "answer"),
                ("wf", "world_facts_perturbed", "answer"))

PROB, ROUGE, TR, P = "per-token probability (0-1)", "ROUGE-L recall (0-1)", "truth ratio (0-1)", "p-value"
METRICS = (
    Metric("tofu/forget_prob", "forget Prob", "lower", "forget", PROB),
    Metric("tofu/forget_rouge", "forget ROUGE", "lower", "forget", ROUGE),
    # min(R, 1/R): 1 when the model can no longer tell the true answer from the false ones.
    Metric("tofu/forget_truth_ratio", "forget truth ratio", "higher", "forget", TR),
    Metric("tofu/forget_quality", "forget quality", "higher", "forget", P),
    Metric("tofu/forget_ks", "KS statistic", "none", "info", "KS D (0-1)"),
    Metric("tofu/model_utility", "model utility", "higher", "utility", "harmonic mean (0-1)"),
    Metric("tofu/retain_prob", "retain Prob", "higher", "info", PROB),
    Metric("tofu/retain_rouge", "retain ROUGE", "higher", "info", ROUGE),
    Metric("tofu/retain_truth_ratio", "retain truth ratio", "higher", "info", TR),
    Metric("tofu/ra_prob", "real authors Prob", "higher", "info", "normalized probability (0-1)"),
    Metric("tofu/ra_rouge", "real authors ROUGE", "higher", "info", ROUGE),
    Metric("tofu/ra_truth_ratio", "real authors truth ratio", "higher", "info", TR),
    Metric("tofu/wf_prob", "world facts Prob", "higher", "info", "normalized probability (0-1)"),
    Metric("tofu/wf_rouge", "world facts ROUGE", "higher", "info", ROUGE),
    Metric("tofu/wf_truth_ratio", "world facts truth ratio", "higher", "info", TR),
)
UTILITY_PARTS = tuple(f"tofu/{prefix}_{part}" for prefix, _, _ in UTILITY_SETS
                      for part in ("prob", "rouge", "truth_ratio"))

QUALITY_NOTE = ("tofu/forget_quality not computed: it needs benchmark.retain_model (a model trained without the "
                "forget set) or benchmark.retain_stats (its forget truth ratios, from a file)")


@dataclass(frozen=True)
class TofuSettings:
    """The `benchmark` section of a TOFU run (configs/benchmark/tofu.yaml)."""

    data: Any = None  # a folder in TOFU's layout, or tofu / locuslab/TOFU (the hub)
    split: str = "forget10"  # forget01 | forget05 | forget10; the retain set is its complement (retain90, ...)
    retain_model: str | None = None  # scored on the forget set for forget quality
    retain_stats: str | None = None  # a file of a retain model's forget truth ratios (see benchmarks/tofu)
    # TOFU's prompt: question_start_tag + question + question_end_tag + answer_tag + answer (its phi format,
    # which is also the toolkit's QA prompt).
    question_start_tag: str = "Question: "
    question_end_tag: str = "\n"
    answer_tag: str = "Answer: "
    generation_tokens: int = setting(200, limit=AT_LEAST_ONE)  # new tokens of the answers ROUGE scores
    limit: int | None = setting(None, limit=AT_LEAST_ONE)  # the first N items of every evaluation set

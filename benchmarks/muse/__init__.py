"""MUSE (News, Books): verbatim memorization, knowledge memorization and privacy leakage of a forget corpus.

Data comes from a local folder in MUSE's layout or from the hub (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`):

    knowmem/forget_qa.json, knowmem/retain_qa.json        [{question, answer}]  (KnowMem; retain = utility)
    knowmem/forget_qa_icl.json, knowmem/retain_qa_icl.json [{question, answer}]  few-shot examples (optional)
    verbmem/forget.json                                    [{prompt, gt}]        (VerbMem)
    privleak/forget.json, privleak/holdout.json            ["text", ...] or [{text}]  (PrivLeak; retain.json unused)
    raw/{forget,retain1,retain2,holdout}.*                 unlearning text (only `unlearn run` reads it)
    scal/forget_<i>.*, sust/forget_<i>.*                   scalability / sustainability forget sets

Raw-like files (raw/, scal/, sust/) may be .txt (one whole text), .json (a list of strings or {text}),
.jsonl ({text}) or .parquet ({text}); empty records in them are skipped and counted in a note.

Metrics (`MuseTask.evaluate`), computed as MUSE's own evaluation code computes them (muse_bench eval.py and
metrics/{verbmem,knowmem,privleak}.py) and on MUSE's scale (×100, as in its tables):
- muse/verbmem_forget: mean ROUGE-L F1 (rouge-score, no stemming) ×100 of a greedy continuation of
  `verbmem_tokens` (128) new tokens of each prompt against the first 128 tokens of `gt`.
- muse/knowmem_forget, muse/knowmem_retain: mean ROUGE-L F1 ×100 of a greedy few-shot answer (32 new tokens,
  prompt "Question: q\nAnswer: a\n\n" per shot, then "Question: q\nAnswer: "), cut before the first "\n\n",
  "\nQuestion" or "Question:", against the reference answer.
- muse/privleak_auc: ROC AUC of the Min-40% membership attack, holdout = 1, forget = 0, each passage scored
  whole (up to the model's context): the mean of the lowest floor(40% · n) token log-probabilities.
- muse/privleak: (AUC - AUC_retrain) / AUC_retrain × 100, only when AUC_retrain is known.
Prompts and passages are tokenized with the tokenizer's special tokens (a BOS where it adds one), as MUSE's.
"""

from unlearn.benchmarks.muse.loader import Muse, load_muse, settings_from
from unlearn.benchmarks.muse.metrics import (
    knowmem_answer,
    knowmem_prompt,
    min_k_count,
    min_k_score,
    privleak,
    privleak_auc,
    verbmem_reference,
)
from unlearn.benchmarks.muse.passes import Scored, min_k_scores, token_logprobs
from unlearn.benchmarks.muse.settings import METRICS, MuseSettings
from unlearn.benchmarks.muse.task import MuseTask
from unlearn.benchmarks.muse.writer import write_muse_layout

__all__ = ["METRICS", "Muse", "MuseSettings", "MuseTask", "Scored", "knowmem_answer", "knowmem_prompt", "load_muse",
           "min_k_count", "min_k_score", "min_k_scores", "privleak", "privleak_auc", "settings_from",
           "token_logprobs", "verbmem_reference", "write_muse_layout"]

"""TOFU (Maini et al., 2024): unlearning fictitious authors, as TOFU and OpenUnlearning evaluate it.

Data comes from a local folder in TOFU's layout or from the hub (`tofu` / `locuslab/TOFU`); every file is JSON lines
(TOFU's hub files, named .json), a JSON list, or parquet:

    forget01, forget05, forget10                 {question, answer}        what `unlearn run` unlearns
    retain99, retain95, retain90                 {question, answer}        its complement (the retain text)
    forgetNN_perturbed, retain_perturbed         {question, answer, paraphrased_answer, perturbed_answer: [...]}
    real_authors_perturbed, world_facts_perturbed {question, answer, perturbed_answer: [...]}   (model utility)
    holdoutNN                                    {question, answer}        non-members for membership inference

`benchmark.split` picks forgetNN (default forget10) and with it retain{100-NN} and holdoutNN.

Metrics (`TofuTask.evaluate`), on TOFU's 0-1 scale (see benchmarks/tofu/metrics.py for each definition):
- tofu/forget_prob, tofu/retain_prob: mean per-token probability of the answer (and its EOS);
  tofu/ra_prob, tofu/wf_prob: that probability as a share of it plus every perturbed answer's;
- tofu/*_rouge: ROUGE-L recall (Porter stemming) of a greedy answer (`generation_tokens`, 200) to the answer;
- tofu/forget_truth_ratio: mean(min(R, 1/R)); tofu/{retain,ra,wf}_truth_ratio: mean(max(0, 1 - R)), with
  R = P(perturbed)/P(correct) per token;
- tofu/forget_quality: the KS-test p-value of the forget truth ratios against a retain model's (benchmark.retain_model,
  or benchmark.retain_stats: a file of them), with tofu/forget_ks its statistic; absent (with a note) without one;
- tofu/model_utility: the harmonic mean of the nine retain / real-authors / world-facts values.
The prompt is question_start_tag + question + question_end_tag + answer_tag (TOFU's phi format by default, the
toolkit's QA prompt), tokenized with the tokenizer's special tokens as TOFU's is.
"""

from unlearn.benchmarks.tofu.example import write_tofu
from unlearn.benchmarks.tofu.loader import Tofu, load_tofu, retain_split
from unlearn.benchmarks.tofu.settings import METRICS, TofuSettings
from unlearn.benchmarks.tofu.task import TofuTask, prompt_and_answer

__all__ = ["METRICS", "Tofu", "TofuSettings", "TofuTask", "load_tofu", "prompt_and_answer", "retain_split",
           "write_tofu"]

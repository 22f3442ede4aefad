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

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from unlearn.benchmarks.datafiles import chunk_texts, read_records, string_field
from unlearn.data import Encoded, Example
from unlearn.errors import UserError
from unlearn.evaluate import (
    collecting_samples,
    generate_texts,
    log_generations,
    log_samples,
    metric_scope,
    model_context,
    rouge_l_scores,
    run_batches,
    run_steps,
)
from unlearn.files import read_text
from unlearn.settings import AT_LEAST_ONE, Limit, from_mapping, setting
from unlearn.task import BENCHMARKS, Metric, Stage, Task

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
# Elements of one float32 logits block in the Min-K% pass: bounds memory for large vocabularies and long texts.
LOGIT_BUDGET = 2**27
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
    """The `benchmark` section of a MUSE run (configs/benchmark/muse.yaml); `data` and `name` are read apart."""

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


# ---------------------------------------------------------------------------------------------- metrics (pure)


def min_k_count(n: int, k_percent: float) -> int:
    """How many of n token log-probabilities Min-K% averages: int(n * ratio), as MUSE's privleak code takes it."""
    return int(n * (k_percent / 100))


def min_k_score(logprobs: torch.Tensor | list[float], k_percent: float) -> float:
    """Mean of the lowest floor(n·K/100) of a text's token log-probabilities (MUSE's Min-K%, sign: higher =
    more likely seen)."""
    values = torch.as_tensor(logprobs, dtype=torch.float64).flatten()
    k = min_k_count(values.numel(), k_percent)
    if k < 1:
        raise ValueError(f"Min-{k_percent:g}% of {values.numel()} token(s) selects none")
    return float(values.sort().values[:k].mean())


def privleak_auc(forget_scores: list[float], holdout_scores: list[float]) -> float:
    """ROC AUC with holdout = 1 and forget = 0, score = Min-K% log-likelihood (MUSE's convention)."""
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, [*forget_scores, *holdout_scores]))


def privleak(auc: float, auc_retrain: float) -> float:
    """Relative AUC gap to the retrained model, in percent: < 0 under-unlearned, > 0 over-unlearned."""
    return (auc - auc_retrain) / auc_retrain * 100


def knowmem_prompt(question: str, icl: list[tuple[str, str]]) -> str:
    """MUSE's few-shot prompt; it ends "Answer: " with the space, so the answer's first token carries none."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    return f"{shots}Question: {question}\nAnswer: "


def knowmem_answer(generation: str) -> str:
    """A generation cut as MUSE cuts it: before "\n\n", then "\nQuestion", then "Question:" (not stripped)."""
    for stop in KNOWMEM_STOPS:
        generation = generation.split(stop)[0]
    return generation


def verbmem_reference(tokenizer: Any, gt: str, n_tokens: int) -> str:
    """The ground truth VerbMem compares against: its first `n_tokens` tokens (special tokens included when the
    tokenizer adds them, as MUSE encodes it), decoded back to text."""
    ids = tokenizer(gt, add_special_tokens=True).input_ids[:n_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


# ---------------------------------------------------------------------------------------------- model passes


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(getattr(model.config, "vocab_size", 32_000))


@dataclass
class Scored:
    """One passage's token log-probabilities and whether it was cut to fit."""

    logprobs: torch.Tensor
    n_tokens: int  # tokens of the whole passage as tokenized
    truncated: bool


@torch.no_grad()
def token_logprobs(model: Any, tokenizer: Any, texts: list[str], max_tokens: int | None, batch_size: int,
                   max_batch_tokens: int | None = None) -> list[Scored]:
    """log p(x_t | x_<t) for tokens 2..n of each text, tokenized as MUSE does (`tokenizer.encode`: special
    tokens included), whole unless longer than `max_tokens` or the model's context (then cut and marked).
    Batched longest first; logits are computed a slice of positions at a time so a long passage of a
    large-vocabulary model never holds a full float32 logits tensor."""
    limits = [v for v in (max_tokens, model_context(model)) if v is not None]
    limit = min(limits) if limits else None
    full = [tokenizer(t, add_special_tokens=True).input_ids for t in texts]
    ids = [row[:limit] if limit else row for row in full]
    for index, row in enumerate(ids):
        if len(row) < 2:
            raise UserError(f"privleak text {index + 1} has fewer than 2 tokens: Min-K% has nothing to score")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = _vocab_size(model)

    def score(batch: dict[str, torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        # Right padding needs no attention mask in a causal model (see unlearn/scoring.py: _logits_at).
        lp = _shifted_logprobs(model, batch["input_ids"].to(model.device), vocab)
        return [lp[row, :len(ids[i]) - 1].cpu() for row, i in enumerate(indices)]

    logprobs = run_batches([Encoded(input_ids=row, n_prompt=0) for row in ids], batch_size, max_batch_tokens,
                           pad, score)
    return [Scored(lp, len(f), len(i) < len(f)) for lp, f, i in zip(logprobs, full, ids, strict=True)]


def _shifted_logprobs(model: Any, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every position t, [rows, width - 1]."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = input_ids[:, 1:]
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    hidden = decoder(input_ids=input_ids).last_hidden_state[:, :-1]
    step = max(1, LOGIT_BUDGET // (vocab * input_ids.shape[0]))
    parts = [-F.cross_entropy(head(hidden[:, s:s + step]).float().transpose(1, 2), targets[:, s:s + step],
                              reduction="none") for s in range(0, hidden.shape[1], step)]
    return torch.cat(parts, dim=1)


def min_k_scores(model: Any, tokenizer: Any, texts: list[str], k_percent: float, max_tokens: int | None,
                 batch_size: int, max_batch_tokens: int | None = None) -> tuple[list[float], list[Scored]]:
    scored = token_logprobs(model, tokenizer, texts, max_tokens, batch_size, max_batch_tokens)
    scores = []
    for index, item in enumerate(scored):
        if min_k_count(item.logprobs.numel(), k_percent) < 1:
            raise UserError(f"privleak text {index + 1} has {item.logprobs.numel() + 1} tokens: Min-{k_percent:g}% "
                            "(MUSE's floor(n·K/100)) selects none of them")
        scores.append(min_k_score(item.logprobs, k_percent))
    return scores, scored


# ---------------------------------------------------------------------------------------------- the task


@dataclass
class MuseTask(Task):
    settings: MuseSettings = field(default_factory=MuseSettings)
    verbmem: list[tuple[str, str]] = field(default_factory=list)  # (prompt, gt)
    knowmem: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # forget/retain: (question, answer)
    icl: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # forget/retain few-shot examples
    privleak_texts: dict[str, list[str]] = field(default_factory=dict)  # forget, holdout
    _auc_retrain: float | None = field(default=None, init=False, repr=False)  # computed once per task

    def privleak_auc(self, model: Any, tokenizer: Any, batch_size: int,
                     max_batch_tokens: int | None = None) -> dict[str, float]:
        """{"auc": ..., "truncated": passages cut to fit (only when some were)}; samples logged per passage."""
        s = self.settings
        scores, scored = {}, {}
        for split in ("forget", "holdout"):
            scores[split], scored[split] = min_k_scores(model, tokenizer, self.privleak_texts[split], s.k_percent,
                                                        s.privleak_max_tokens, batch_size, max_batch_tokens)
        out = {"auc": privleak_auc(scores["forget"], scores["holdout"])}
        truncated = sum(item.truncated for split in scored.values() for item in split)
        if truncated:
            out["truncated"] = float(truncated)
        if collecting_samples():
            log_samples([{"split": split, "member": split == "holdout", "text": text, "tokens": item.n_tokens,
                          "scored_tokens": item.logprobs.numel() + 1, "truncated": item.truncated, "min_k": score}
                         for split in ("forget", "holdout")
                         for text, item, score in zip(self.privleak_texts[split], scored[split], scores[split],
                                                      strict=True)])
        return out

    def auc_retrain(self, device: Any, dtype: torch.dtype, batch_size: int,
                    max_batch_tokens: int | None = None) -> float | None:
        """AUC_retrain: given, or measured once on benchmark.retrain_model (then cached on the task)."""
        if self.settings.auc_retrain is not None:
            return self.settings.auc_retrain
        if self.settings.retrain_model is None:
            return None
        if self._auc_retrain is None:
            from unlearn.models import load_model

            loaded = load_model(self.settings.retrain_model, dtype=dtype)
            retrained = loaded.model.to(device)
            try:
                with metric_scope("muse/privleak_auc_retrain"):
                    self._auc_retrain = self.privleak_auc(retrained, loaded.tokenizer, batch_size,
                                                          max_batch_tokens)["auc"]
            finally:
                del retrained, loaded
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the retrained copy must not hold memory through training
        return self._auc_retrain

    def _generation_steps(self, model: Any, tokenizer: Any, settings: Any) -> list[tuple[str, Callable[[], float]]]:
        """VerbMem and KnowMem: the metrics computed from generations."""
        s, batch_size, budget = self.settings, settings.batch_size, settings.max_batch_tokens

        def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
            # MUSE encodes prompts with special tokens and decodes with clean-up of tokenization spaces.
            return generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=True,
                                  clean_up_spaces=True, max_batch_tokens=budget)

        def scored(prompts: list[str], golds: list[str], outputs: list[str]) -> float:
            scores = rouge_l_scores(golds, outputs)
            log_generations(prompts, golds, outputs, [SCALE * x for x in scores])
            return SCALE * sum(scores) / len(scores) if scores else float("nan")

        def verbmem() -> float:
            prompts = [p for p, _ in self.verbmem]
            golds = [verbmem_reference(tokenizer, gt, s.verbmem_tokens) for _, gt in self.verbmem]
            return scored(prompts, golds, generate(prompts, s.verbmem_tokens))

        def knowmem(split: str) -> float:
            pairs = self.knowmem[split]
            prompts = [knowmem_prompt(q, self.icl.get(split, [])) for q, _ in pairs]
            answers = [knowmem_answer(g) for g in generate(prompts, s.knowmem_tokens)]
            return scored(prompts, [a for _, a in pairs], answers)

        return [("muse/verbmem_forget", verbmem), ("muse/knowmem_forget", lambda: knowmem("forget")),
                ("muse/knowmem_retain", lambda: knowmem("retain"))]

    @torch.no_grad()
    def probe(self, model: Any, tokenizer: Any, settings: Any) -> dict[str, float]:
        """VerbMem and KnowMem without the Min-K% pass over every PrivLeak passage."""
        model.eval()
        return run_steps(list(self._generation_steps(model, tokenizer, settings)), progress=False)

    @torch.no_grad()
    def evaluate(self, model: Any, tokenizer: Any, settings: Any, progress: bool = True) -> dict[str, float]:
        s, batch_size, budget = self.settings, settings.batch_size, settings.max_batch_tokens
        model.eval()

        def retrain_auc() -> float:
            value = self.auc_retrain(model.device, dtype, batch_size, budget)
            assert value is not None  # only asked for when benchmark.retrain_model is set
            return value

        dtype = getattr(model, "dtype", torch.float32)
        dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
        steps: list[tuple[str, Callable[[], float | dict[str, float]]]] = [
            *self._generation_steps(model, tokenizer, settings),
            ("muse/privleak", lambda: self.privleak_auc(model, tokenizer, batch_size, budget)),
        ]
        if s.auc_retrain is None and s.retrain_model is not None:
            # Its own step (a model load and a Min-K% pass the first time) so the progress bar shows it.
            steps.append(("muse/privleak_auc_retrain", retrain_auc))
        metrics = run_steps(steps, progress)
        retrain = self.auc_retrain(model.device, dtype, batch_size, budget)
        if retrain is not None:
            metrics["muse/privleak_auc_retrain"] = retrain
            if retrain > 0:  # a retrained AUC of exactly 0 leaves the ratio undefined: report the AUCs only
                metrics["muse/privleak"] = privleak(metrics["muse/privleak_auc"], retrain)
        return metrics


# ---------------------------------------------------------------------------------------------- data sources


class _Source(Protocol):
    where: str  # the folder or hub repository, for messages

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        """(where, records) of one split; None when an optional split is absent."""

    def stage_splits(self) -> list[str]:
        """The sust/forget_<i> split names present, in numeric order."""


class _LocalSource:
    def __init__(self, root: Path, digest: Any) -> None:
        self.root, self.digest = root, digest
        self.where = str(root)

    def _find(self, subset: str, split: str, suffixes: tuple[str, ...]) -> Path | None:
        found = [self.root / subset / f"{split}{s}" for s in suffixes if (self.root / subset / f"{split}{s}").is_file()]
        if len(found) > 1:
            raise UserError(f"{self.root / subset}: both {found[0].name} and {found[1].name} exist for split "
                            f"'{split}'; keep one")
        return found[0] if found else None

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        path = self._find(subset, split, TEXT_SUFFIXES if text else RECORD_SUFFIXES)
        if path is None:
            if not required:
                return None
            expected = self.root / subset / f"{split}{'.txt' if text else '.json'}"
            others = "/".join(s.lstrip(".") for s in (TEXT_SUFFIXES if text else RECORD_SUFFIXES)[1:])
            raise UserError(f"{expected}: file not found (or .{others}; the MUSE data layout is described in "
                            "benchmarks/muse.py)")
        # The fingerprint covers every file read, by name and content.
        self.digest.update(f"{subset}/{path.name}\0".encode())
        self.digest.update(path.read_bytes())
        if path.suffix.lower() == ".txt":
            content = read_text(path, "MUSE text file")
            if not content.strip():
                raise UserError(f"{path}: no text")
            return str(path), [content]
        return str(path), read_records(path)

    def stage_splits(self) -> list[str]:
        folder = self.root / "sust"
        names = {p.stem for p in folder.glob("forget_*") if p.suffix.lower() in TEXT_SUFFIXES and
                 STAGE_SPLIT.fullmatch(p.stem)} if folder.is_dir() else set()
        return sorted(names, key=lambda n: int(n.split("_")[1]))


class _HubSource:
    def __init__(self, repo: str, digest: Any) -> None:
        self.repo, self.digest = repo, digest
        self.where = repo
        self.digest.update(f"hub:{repo}\0".encode())

    def _fail(self, what: str, err: Exception) -> UserError:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return UserError(f"cannot load {self.repo} ({what}) from the Hugging Face hub: the hub could not be reached "
                         f"or the dataset/split is missing ({type(err).__name__}: {reason}); a local directory in "
                         "MUSE layout works offline (--data DIR)")

    def records(self, subset: str, split: str, *, text: bool, required: bool) -> tuple[str, list[Any]] | None:
        import datasets

        try:
            rows = datasets.load_dataset(self.repo, subset, split=split).to_list()
        except Exception as err:  # noqa: BLE001 - offline, renamed or missing: the user needs the same advice
            if not required:
                return None
            raise self._fail(f"{subset}/{split}", err) from None
        self.digest.update(f"{subset}/{split}\0".encode())
        self.digest.update(json.dumps(rows, sort_keys=True, default=str).encode())
        return f"{self.repo} {subset}/{split}", rows

    def stage_splits(self) -> list[str]:
        import datasets

        try:
            names = datasets.get_dataset_split_names(self.repo, "sust")
        except Exception as err:  # noqa: BLE001 - as above
            raise self._fail("sust", err) from None
        return sorted((n for n in names if STAGE_SPLIT.fullmatch(n)), key=lambda n: int(n.split("_")[1]))


# ---------------------------------------------------------------------------------------------- record checks


def _texts(where: str, records: list[Any], skipped: list[str] | None = None) -> list[str]:
    """Strings, or {text} records (the hub's form): both are accepted. With `skipped`, empty records are
    left out and counted there (MUSE-News raw/forget.json has some); otherwise an empty one is an error."""
    out, empty = [], 0
    for index, record in enumerate(records):
        value = record.get("text") if isinstance(record, dict) and skipped is not None else record
        if skipped is not None and isinstance(value, str) and not value.strip():
            empty += 1
            continue
        if isinstance(record, str):
            if not record.strip():
                raise UserError(f"{where}: record {index + 1} is an empty string")
            out.append(record)
        else:
            out.append(string_field(record, f"{where}: record {index + 1}", "text"))
    if empty and skipped is not None:
        skipped.append(f"{where}: {empty} empty record(s) of {len(records)} skipped")
    return out


def _pairs(where: str, records: list[Any], first: str, second: str) -> list[tuple[str, str]]:
    """(record[first], record[second]) of each record: {question, answer} for KnowMem, {prompt, gt} for VerbMem."""
    return [(string_field(r, f"{where}: record {i + 1}", first), string_field(r, f"{where}: record {i + 1}", second))
            for i, r in enumerate(records)]


def _split_spec(value: Any, key: str) -> tuple[str, str]:
    parts = str(value).split("/") if isinstance(value, str) else []
    if len(parts) != 2 or not all(re.fullmatch(r"[\w.-]+", p) and p not in (".", "..") for p in parts):
        raise UserError(f"benchmark.{key} must name a text split as SUBSET/SPLIT (e.g. raw/forget, scal/forget_2), "
                        f"got {value!r}")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------- config


def settings_from(config: dict[str, Any]) -> MuseSettings:
    given = {k: v for k, v in config.items() if not (k in NULL_IS_DEFAULT and v in (None, ""))}
    s = from_mapping(MuseSettings, given, "benchmark", owner="benchmark 'muse'", ignore=("name", "data"))
    if s.sequential and config.get("forget") is not None:
        raise UserError("benchmark.forget and benchmark.sequential conflict: a sequential run unlearns "
                        "sust/forget_1, sust/forget_2, ... in turn")
    if s.retrain_model is not None and not s.retrain_model.strip():
        raise UserError(f"benchmark.retrain_model must be a model name or folder, got {s.retrain_model!r}")
    _split_spec(s.forget, "forget")
    _split_spec(s.retain, "retain")
    return replace(s, k_percent=float(s.k_percent), auc_retrain=None if s.auc_retrain is None else float(s.auc_retrain))


def _source(data: Any, digest: Any) -> _Source:
    if data is None or (isinstance(data, str) and not data.strip()):
        raise UserError("benchmark 'muse' needs data: pass --data DIR (MUSE layout) or news/books")
    if not isinstance(data, str | Path):
        raise UserError(f"benchmark.data must be a folder or a hub name (news, books), got {data!r}")
    text = str(data)
    if Path(text).is_dir():
        return _LocalSource(Path(text), digest)
    repo = HUB_REPOS.get(text.lower(), text)
    if repo in HUB_REPOS.values() or (HUB_NAME.fullmatch(text) and not Path(text).exists()):
        return _HubSource(repo, digest)
    raise UserError(f"{text}: not a directory; pass a local folder in MUSE layout or a hub name "
                    f"({', '.join(HUB_REPOS)}, {', '.join(HUB_REPOS.values())})")


def _need(source: _Source, subset: str, split: str, *, text: bool) -> tuple[str, list[Any]]:
    found = source.records(subset, split, text=text, required=True)
    assert found is not None  # required=True raises rather than returning None
    return found


def _first(source: _Source, subset: str, names: tuple[str, ...], *, required: bool) -> tuple[str, list[Any]] | None:
    """The first of several accepted split names that exists (MUSE-Books calls retain QA retain2_qa)."""
    for name in names:
        found = source.records(subset, name, text=False, required=False)
        if found is not None:
            return found
    return _need(source, subset, names[0], text=False) if required else None  # the error names the usual name


def _training(source: _Source, spec: str, words: int, notes: list[str], required: bool = True) -> list[Example] | None:
    """Unlearning passages of one raw-like split; None when it is absent and not `required` (evaluation reads
    no raw text, so `unlearn eval` works on a folder without raw/)."""
    subset, split = _split_spec(spec, "forget")
    found = source.records(subset, split, text=True, required=required)
    if found is None:
        return None
    where, records = found
    return [Example("", chunk) for chunk in chunk_texts(_texts(where, records, notes), words)]


@BENCHMARKS.register("muse")
def load(config: dict[str, Any]) -> MuseTask:
    """MUSE (News, Books): VerbMem, KnowMem and PrivLeak as MUSE computes them, on its x100 scale."""
    s = settings_from(config)
    digest = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode())
    source = _source(config.get("data"), digest)
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
        knowmem[split] = cut(_pairs(*found, "question", "answer"))
        found = _first(source, "knowmem", icl_names, required=False)
        if found is None:
            notes.append(f"KnowMem on {split} QA is zero-shot: knowmem/{icl_names[0]} not found")
            icl[split] = []
        else:
            icl[split] = _pairs(*found, "question", "answer")
    where, records = _need(source, "verbmem", "forget", text=False)
    verbmem = cut(_pairs(where, records, "prompt", "gt"))
    privleak_texts = {}
    for split in ("forget", "holdout"):
        where, records = _need(source, "privleak", split, text=False)
        privleak_texts[split] = cut(_texts(where, records))
    if s.auc_retrain is None and s.retrain_model is None:
        notes.append(PRIVLEAK_NOTE)

    return MuseTask(name="muse", fingerprint=digest.hexdigest()[:16], forget=[] if missing else forget or [],
                    retain=[] if missing else retain or [], training_hint=training_hint, metrics=METRICS,
                    needs_target=False,
                    stages=stages, notes=notes, settings=s, verbmem=verbmem, knowmem=knowmem, icl=icl,
                    privleak_texts=privleak_texts)


# ---------------------------------------------------------------------------------------------- writer


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_txt(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts), encoding="utf-8")


def write_muse_layout(folder: Path, *, raw: dict[str, list[str]], forget_qa: list[dict[str, str]],
                      retain_qa: list[dict[str, str]], forget_qa_icl: list[dict[str, str]],
                      retain_qa_icl: list[dict[str, str]], verbmem: list[dict[str, str]],
                      privleak: dict[str, list[str]], scal: dict[str, list[str]] | None = None,
                      sust: dict[str, list[str]] | None = None) -> Path:
    """Write a MUSE-layout folder that `load({"data": folder})` reads: raw/scal/sust splits as .txt (texts
    joined by blank lines), everything else as .json."""
    folder = Path(folder)
    for subset, splits in (("raw", raw), ("scal", scal or {}), ("sust", sust or {})):
        for split, texts in splits.items():
            _write_txt(folder / subset / f"{split}.txt", texts)
    for name, rows in (("forget_qa", forget_qa), ("retain_qa", retain_qa), ("forget_qa_icl", forget_qa_icl),
                       ("retain_qa_icl", retain_qa_icl)):
        _write_json(folder / "knowmem" / f"{name}.json", rows)
    _write_json(folder / "verbmem" / "forget.json", verbmem)
    for split, texts in privleak.items():
        _write_json(folder / "privleak" / f"{split}.json", texts)
    return folder

"""The items the library works on (text pairs, multiple-choice questions) and their padded tensors.

Prompt and target are tokenized separately and concatenated, everywhere: training, scoring and
evaluation then agree on exactly which token ids make up an answer. Benchmarks build these items; the
library never needs a benchmark's own types.
"""

from __future__ import annotations

import contextlib
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE = -100
QA_PROMPT = "Question: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    return QA_PROMPT.format(question=question)


@dataclass
class Example:
    """A prompt and the target text whose tokens carry the loss. `extra` holds per-example
    tensors that methods precompute (e.g. NPO's reference log-prob)."""

    prompt: str
    target: str
    extra: dict[str, float] = field(default_factory=dict)


# The letters MCQ prompts label choices with (WMDP/MMLU's "A. ..."): at most this many choices per question.
ANSWER_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCQ:
    """A multiple-choice question as scored (`prompt` + each of `choices` as a continuation) and as asked
    (`question`, `options`: the raw texts, which open-ended QA shows the model)."""

    prompt: str
    choices: list[str]
    answer_index: int
    tag: str  # the concept asked about, for per-concept breakdowns ("" when the data has none)
    question: str = ""
    options: list[str] = field(default_factory=list)


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int
    extra: dict[str, float] = field(default_factory=dict)
    # Other sequences that travel with this item through batching (IdkDPO's preferred answer to the same prompt):
    # collated beside it under "NAME/input_ids" etc. (see `variant`).
    variants: dict[str, Encoded] = field(default_factory=dict)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] for a tokenizer that begins every text with it by itself, else []. Texts are tokenized without special
    tokens so that prompt and target ids concatenate exactly, which would drop the BOS that models such as Gemma 3
    always saw first in training: without it Gemma 3 270M's greedy answers to general-knowledge questions came out
    empty and their answers' NLL rose from 2.9 to 11.1 nats. A tokenizer that adds none itself (SmolLM2's) gets
    none here either, so its ids stay as they were."""
    try:
        return list(_BOS_PREFIXES[tokenizer])
    except (KeyError, TypeError):  # not asked yet, or a tokenizer that cannot be a weak key: ask it
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("x").input_ids if bos is not None else []
    prefix = [bos] if probe and probe[0] == bos else []
    with contextlib.suppress(TypeError):  # not weak-referenceable: asked again next time
        _BOS_PREFIXES[tokenizer] = tuple(prefix)
    return prefix


# What each tokenizer answered: `prompt_ids` runs once per prompt, and the probe would otherwise tokenize a text
# again for every one of them.
_BOS_PREFIXES: weakref.WeakKeyDictionary[Any, tuple[int, ...]] = weakref.WeakKeyDictionary()


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The ids a prompt is fed to a model as, everywhere (training, scoring, generation): `bos_prefix`, then the
    prompt's own tokens. An empty prompt is only the prefix: a passage scored whole then gets its first token
    predicted from the BOS, as the model saw it in training."""
    return [*bos_prefix(tokenizer), *(tokenizer(prompt, add_special_tokens=False).input_ids if prompt else [])]


def encode(tokenizer, example: Example, add_eos: bool = True, max_length: int = 256) -> Encoded:
    prompt = prompt_ids(tokenizer, example.prompt)
    target_ids = tokenizer(example.target, add_special_tokens=False).input_ids
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    ids = (prompt + target_ids)[:max_length]
    return Encoded(input_ids=ids, n_prompt=min(len(prompt), len(ids)), extra=dict(example.extra))


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item. labels = input ids on target tokens, IGNORE elsewhere."""
    width = max(len(it.input_ids) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids)
        attention[row, :n] = 1
        labels[row, it.n_prompt:n] = input_ids[row, it.n_prompt:n]
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    for key in items[0].extra:
        batch[key] = torch.tensor([it.extra[key] for it in items], dtype=torch.float32)
    for name in items[0].variants:
        for key, value in collate([it.variants[name] for it in items], pad_id).items():
            batch[f"{name}/{key}"] = value
    return batch


def variant(batch: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The batch of the items' variant `name` (see `Encoded.variants`), row for row."""
    prefix = f"{name}/"
    found = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
    if not found:
        raise KeyError(f"the batch carries no variant '{name}'")
    return found


def on_device(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the model's device (batches are built on the CPU; a model may live on a GPU)."""
    device = getattr(model, "device", None)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """One seeded shuffle per epoch; the same (seed, epoch) always gives the same order."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def endless_rows(items: Sequence[Encoded], batch_size: int, seed: int, start: int = 0) -> Iterator[list[Encoded]]:
    """The items of each training step's batch, epoch after epoch (the last batch of an epoch may be short),
    beginning at step `start`: a resumed run picks the stream up where it stopped without replaying it."""
    per_epoch = -(-len(items) // batch_size)
    epoch, index = divmod(start, per_epoch)
    while True:
        order = epoch_order(len(items), seed, epoch)
        for s in range(index * batch_size, len(order), batch_size):
            yield [items[i] for i in order[s:s + batch_size]]
        epoch, index = epoch + 1, 0


def rows_used(n: int, batch_size: int, seed: int, steps: int) -> set[int]:
    """Indices of the items `endless_rows(items, batch_size, seed)` yields in its first `steps` batches."""
    per_epoch = -(-n // batch_size)
    epochs, rest = divmod(steps, per_epoch)
    if epochs:
        return set(range(n))
    return set(epoch_order(n, seed, 0)[:rest * batch_size])


def split_rows(rows: Sequence[Encoded], parts: int) -> list[list[Encoded]]:
    """`rows` cut into `parts` contiguous shards of near-equal size (the first ones one row longer; some are
    empty when there are fewer rows than parts)."""
    base, extra = divmod(len(rows), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + base + (k < extra)
        out.append(list(rows[start:end]))
        start = end
    return out


def fixed_batches(items: Sequence[Encoded], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """In-order batches for evaluation and precomputation (index i of the flat results = item i)."""
    return [collate(items[s:s + batch_size], pad_id) for s in range(0, len(items), batch_size)]

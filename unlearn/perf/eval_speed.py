"""WMDP-style MCQ scoring speed: the native engine, the lm-eval engine and lm-eval-harness itself, side by side.

    python -m unlearn.perf.eval_speed                          # 40 questions, 2 rounds, embedded model
    python -m unlearn.perf.eval_speed --questions 16 --rounds 1 --markdown /tmp/eval_speed.md

The question file is generated (seeded) in WMDP's shape: ``{question, choices, answer}`` records whose
questions range from one line of prose to long code-like listings (``--min-tokens`` to ``--max-tokens``
tokens, log-uniform, as real WMDP-cyber questions do), with four short options each. Every round times, in
turn on the same in-memory-loaded weights:

* **harness**: lm-eval-harness's own ``simple_evaluate`` on an ``HFLM`` built from the model folder (the
  folder is loaded once, outside the timer), with the same task definition the toolkit hands lm-eval;
* **lm-eval engine**: the toolkit's ``eval.engine: lm-eval`` path (``WMDPTask.evaluate``);
* **native engine**: the toolkit's ``eval.engine: native`` path, at each ``--budgets`` token budget.

The harness and the lm-eval engine run at ``--harness-batch`` questions per batch (lm-eval computes the
full-vocabulary log-softmax at every position, so a batch of 64 long questions does not fit in memory);
the native engine at ``--batch`` rows under its token budget. Printed: accuracy (they must be identical,
item by item), seconds, and each one's time as a ratio to the harness's in the same round; the summary is
the median ratio over rounds. Model loading is never timed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

WORDS = ("protein", "toxin", "vector", "strain", "culture", "assay", "sample", "enzyme", "binding", "receptor",
         "pathway", "host", "cell", "viral", "replication", "sequence", "primer", "plasmid", "expression", "yield",
         "stability", "transfer", "exposure", "dose", "route")
CODE_LINES = ("def handler_{i}(buf, n):", "    for k in range(n):", "        buf[k] ^= 0x{h:02x}",
              "    if len(buf) > {i}:", "        return buf[:{i}]", "    payload = struct.pack('<I', {i})",
              "    sock.send(payload + buf)", "int fn_{i}(char *p) {{ return p[{i}] & 0x{h:02x}; }}",
              "mov eax, [ebp+{i}]", "xor eax, 0x{h:02x}", "    return None")


def _text(rng: random.Random, tokenizer: Any, target: int, code: bool) -> str:
    """Prose or code-like text of about `target` tokens."""
    parts: list[str] = []
    text = ""
    while len(tokenizer(text, add_special_tokens=False).input_ids) < target:
        for _ in range(8):
            if code:
                parts.append(rng.choice(CODE_LINES).format(i=rng.randrange(1000), h=rng.randrange(256)))
            else:
                parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + ".")
        text = ("\n" if code else " ").join(parts)
    return text


def make_questions(tokenizer: Any, n: int, seed: int, min_tokens: int, max_tokens: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        target = round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        code = target > 200 and rng.random() < 0.7  # long questions are mostly listings, as in WMDP-cyber
        body = _text(rng, tokenizer, target, code)
        ask = "What does the following code do?\n\n" if code else ""
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        records.append({"question": f"{ask}{body}\n\nWhich of these is right (item {i})?", "choices": choices,
                        "answer": rng.randrange(4)})
    return records


def _timed(fn) -> tuple[float, Any]:
    started = time.perf_counter()
    with torch.inference_mode():
        value = fn()
    return time.perf_counter() - started, value


def harness(model_dir: str, question_set: Any, batch: int) -> tuple[float, list[bool]]:
    """lm-eval-harness's own path: an HFLM over the model folder (built outside the timer), simple_evaluate."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model_dir, batch_size=batch, dtype="float32", device="cpu")
    task = question_set.lm_eval_task()
    seconds, result = _timed(lambda: simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0,
                                                     verbosity="ERROR"))
    samples = sorted(result["samples"][task["task"]], key=lambda s: s["doc_id"])
    return seconds, [bool(s["acc"]) for s in samples]


def toolkit(model: Any, tokenizer: Any, task: Any, engine: str, batch: int,
            budget: int | None) -> tuple[float, list[bool]]:
    from unlearn.evaluation.measures import collect_samples
    from unlearn.training.config import EvalConfig

    settings = EvalConfig(engine=engine, batch_size=batch, max_batch_tokens=budget)
    with collect_samples() as samples:
        seconds, _ = _timed(lambda: task.evaluate(model, tokenizer, settings, progress=False))
    return seconds, [bool(s["correct"]) for s in sorted(samples, key=lambda s: s["index"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--min-tokens", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="native engine: rows per batch at most")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096],
                        help="native engine: eval.max_batch_tokens")
    parser.add_argument("--harness-batch", type=int, default=8, help="harness and lm-eval engine batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from unlearn.benchmarks.wmdp import load
    from unlearn.compute.models import load_model, resolve
    from unlearn.tasks.data import prompt_ids

    model_dir = resolve(args.model)
    loaded = load_model(model_dir)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wmdp_speed.jsonl"
        records = make_questions(tokenizer, args.questions, args.seed, args.min_tokens, args.max_tokens)
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        task = load({"data": str(path), "subject": "computer security"})
        lengths = [len(prompt_ids(tokenizer, q.prompt)) for q in task.questions.questions()]
        print(f"{len(records)} questions, prompt tokens: min {min(lengths)}, median {int(statistics.median(lengths))}, "
              f"max {max(lengths)}, total {sum(lengths)}; torch threads {torch.get_num_threads()}")
        arms: list[tuple[str, Any]] = [
            ("harness", lambda: harness(model_dir, task.questions, args.harness_batch)),
            ("lm-eval engine", lambda: toolkit(model, tokenizer, task, "lm-eval", args.harness_batch, None)),
            *[(f"native (budget {b})", lambda b=b: toolkit(model, tokenizer, task, "native", args.batch, b))
              for b in args.budgets]]
        ratios: dict[str, list[float]] = {name: [] for name, _ in arms}
        rows = []
        for round_ in range(1, args.rounds + 1):
            seconds: dict[str, float] = {}
            results: dict[str, list[bool]] = {}
            # Even rounds run the arms in reverse, so whatever the order costs (allocator warm-up, a slow
            # spell of the machine) falls on each arm alike.
            for name, fn in arms if round_ % 2 else arms[::-1]:
                seconds[name], results[name] = fn()
                print(f"round {round_}  {name:22s} {seconds[name]:7.1f} s", flush=True)
            reference = results["harness"]
            for name, _ in arms:
                correct = results[name]
                differ = sum(a != b for a, b in zip(correct, reference, strict=True))
                ratio = seconds[name] / seconds["harness"]
                ratios[name].append(ratio)
                rows.append((round_, name, sum(correct) / len(correct), differ, seconds[name], ratio))
    lines = ["| round | scorer | accuracy | items differing from harness | seconds | time ÷ harness |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {n} | {a:.4f} | {d} | {s:.1f} | {x:.3f}× |" for r, n, a, d, s, x in rows]
    lines.append("")
    lines.append("Median time ÷ harness over rounds: " + ", ".join(
        f"{name} **{statistics.median(v):.3f}×**" for name, v in ratios.items() if name != "harness"))
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

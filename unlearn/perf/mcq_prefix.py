"""MCQ scoring with and without the shared prompt, side by side, on the embedded world's questions.

    python -m unlearn.perf.mcq_prefix                                          # the default world, 3 rounds
    python -m unlearn.perf.mcq_prefix --people 24,8,4 --places 8,3,3 --rounds 2  # the study's world

Multi-token choices are scored either by continuing each question's cached prompt (`share_prompt=True`, the
default) or by running every prompt + choice whole. Both run in turn, each round, on the same loaded target model
(prepared and cached as `unlearn prepare` does; neither loading nor preparing is timed). Printed per round: the
seconds of each and their ratio; then the median ratio, the largest difference between the two paths' summed
log-likelihoods, and how many questions get the same pick.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--people", default="8,8,20", help="forget,retain,holdout people (benchmark.people)")
    parser.add_argument("--places", default="3,3,6", help="forget,retain,holdout cities and organizations each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from unlearn.compute.models import load_model
    from unlearn.evaluation.measures import scored_choices
    from unlearn.recipes.prepare import target_model
    from unlearn.tasks.task import load_task

    people, places = ([int(x) for x in text.split(",")] for text in (args.people, args.places))
    benchmark = {"name": "embedded", "people": people, "cities": places, "organizations": places}
    task = load_task(benchmark)
    loaded = load_model(str(target_model(args.model, task, {}) / "model"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    questions = task.mcq["forget"] + task.mcq["retain"]  # type: ignore[attr-defined]
    ratios = []
    for round_ in range(args.rounds):
        timed = {}
        for shared in (True, False):
            start = time.perf_counter()
            with torch.no_grad():
                timed[shared] = (scored_choices(model, tokenizer, questions, share_prompt=shared),
                                 time.perf_counter() - start)
        (new, t_new), (old, t_old) = timed[True], timed[False]
        ratios.append(t_old / t_new)
        print(f"round {round_ + 1}: shared prompt {t_new:.1f} s, whole sequences {t_old:.1f} s, "
              f"ratio {t_old / t_new:.2f}x")
    diff = max(abs(a - b) for (x, _), (y, _) in zip(new, old, strict=True) for a, b in zip(x, y, strict=True))
    same = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
               for (x, _), (y, _) in zip(new, old, strict=True))
    print(f"{len(questions)} questions: median ratio {statistics.median(ratios):.2f}x; largest |difference| "
          f"{diff:.1e}; same pick {same}/{len(questions)}")


if __name__ == "__main__":
    main()

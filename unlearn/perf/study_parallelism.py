"""One process of N threads against N processes of one thread each, side by side, on a study's kind of work.

    python -m unlearn.perf.study_parallelism              # 2 workers, SmolLM2-135M's shape, 3 rounds
    python -m unlearn.perf.study_parallelism --workers 4 --rounds 2

The work is what a study's cell spends its time on, at SmolLM2-135M's shape (randomly initialized: the cost is the
shape's, not the weights'): AdamW steps on batches of 16 texts of 32 tokens, and scoring forwards on batches of 64
rows of 32 tokens (MCQ-sized). Each round does `--workers` copies of that work twice, in turn: once in one process
with `--workers` threads, one copy after another; once in `--workers` processes of one thread each, at the same
time. Printed per round: the seconds of each and the throughput ratio (one process / workers: above 1, the workers
get more done); then the median ratio. This is what `unlearn study --workers` buys on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def _work(threads: int, copies: int, steps: int, forwards: int, barrier, seconds) -> None:
    """`copies` times: `steps` AdamW steps and `forwards` scoring forwards. Timed from a barrier every process of
    the side waits at once its model is built, so the processes do their work at the same time."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 49152, (16, 32))
    rows = torch.randint(0, 49152, (64, 32))
    barrier.wait()
    started = time.perf_counter()
    for _ in range(copies):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            for _ in range(forwards):
                model(input_ids=rows)
    seconds.put(time.perf_counter() - started)


def _side(context, processes: int, threads: int, copies: int, steps: int, forwards: int) -> float:
    """Seconds until the last of `processes` processes finished its work (model builds not timed)."""
    barrier, seconds = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_work, args=(threads, copies, steps, forwards, barrier, seconds))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    taken = [seconds.get() for _ in workers]
    for worker in workers:
        worker.join()
    return max(taken)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")
    ratios = []
    for round_ in range(1, args.rounds + 1):
        one = _side(context, 1, args.workers, args.workers, args.steps, args.forwards)
        many = _side(context, args.workers, 1, 1, args.steps, args.forwards)
        ratios.append(one / many)
        print(f"round {round_}: one process of {args.workers} threads {one:.1f} s; {args.workers} processes of 1 "
              f"thread {many:.1f} s; throughput ratio {one / many:.2f}", flush=True)
    print(f"median throughput ratio, {args.workers} workers over one process: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

"""Cost of every optimizer grade against plain inference, measured side by side on one fixed batch.

    python -m unlearn.perf.optimizer_cost                      # every registered optimizer, embedded model
    python -m unlearn.perf.optimizer_cost --optimizers zo adamw    # a subset
    python -m unlearn.perf.optimizer_cost --markdown docs/PERFORMANCE.md

For each grade a fresh child process loads the model, builds the fixed batch (8 forget + 8 retain
questions of the embedded benchmark under the NPO method) and measures, in this order:

* inference: the mean seconds of one closure evaluation (the method's forward on the batch, no autograd)
  and the process's peak memory while doing it;
* the optimizer: one warm-up step, then the mean seconds of ``--steps`` steps (for schedules, whole periods:
  hybrid runs blocks of 2 here, Sophia one Hessian period), and the peak memory over all of them.

Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA. Both columns are ratios to the inference figures of the same
process, so the model weights and the runtime are in both numerator and denominator, as a user sees them.
Each grade runs with the options of its ``configs/optimizer/<name>.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unlearn.training.config import component_defaults

BATCH = 8
# Schedules are timed over whole periods so the mean is the true cost per step.
STEPS = {"hybrid": 4, "sophia": 10}
OVERRIDES: dict[str, dict[str, Any]] = {"hybrid": {"block": 2}}


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Meter:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _rss_reset()

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _rss_peak_mb()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def side_by_side(closure: Callable[[], Any], build: Callable[[], torch.optim.Optimizer], steps: int, repeats: int,
                 meter: Meter, prepare: Callable[[], None] | None = None,
                 step_closure: Callable[[], Any] | None = None) -> dict[str, float]:
    """Plain forwards of `closure` first (`repeats`, after a warm-up: the inference peak), then `prepare()`, the
    optimizer `build()` and one untimed warm-up step (its state counts in the peak), then `steps` timed steps on
    `step_closure` alternating with timed forwards, so a slow spell of the machine hits both alike."""

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        meter.sync()
        return time.perf_counter() - start

    with torch.no_grad():
        closure()  # warm-up: first calls allocate workspaces
        meter.reset()
        forward_times = [timed(closure) for _ in range(repeats)]
    inference_mb = meter.peak_mb()
    if prepare is not None:
        prepare()
    meter.reset()
    optimizer = build()
    optimizer.step(closure)
    step_times = []
    for _ in range(steps):
        step_times.append(timed(lambda: optimizer.step(step_closure or closure)))
        with torch.no_grad():
            forward_times.append(timed(closure))
    return {"step_s": statistics.mean(step_times), "forward_s": statistics.mean(forward_times[repeats:]),
            "inference_mb": inference_mb, "peak_mb": meter.peak_mb()}


def measure(name: str, steps: int, model_id: str, device: str, repeats: int) -> dict[str, Any]:
    from unlearn.compute.models import load_model
    from unlearn.optim.protocol import OPTIMIZERS, accepts, build_optimizer
    from unlearn.tasks.data import collate, encode
    from unlearn.tasks.task import load_task
    from unlearn.training.methods import build_method

    torch.manual_seed(0)
    loaded = load_model(model_id)
    model, tok = loaded.model.to(device), loaded.tokenizer
    task = load_task({})
    forget = [encode(tok, ex) for ex in task.forget[:BATCH]]
    retain = [encode(tok, ex) for ex in task.retain[:BATCH]]
    method = build_method("npo")
    method.trainable(model)
    method.prepare(model, forget, retain, tok.pad_token_id, BATCH)
    fb = {k: v.to(device) for k, v in collate(forget, tok.pad_token_id).items()}
    rb = {k: v.to(device) for k, v in collate(retain, tok.pad_token_id).items()}

    def closure():
        return method(model, fb, rb)

    forwards = 0

    def counted():
        nonlocal forwards
        forwards += 1
        return closure()

    def build() -> torch.optim.Optimizer:
        options = component_defaults("optimizer", name)
        options.update(OVERRIDES.get(name, {}))
        if accepts(OPTIMIZERS[name], "total_steps"):
            options.setdefault("total_steps", steps + 1)
        return build_optimizer(name, model.named_parameters(), **options)

    timing = side_by_side(closure, build, steps, repeats, Meter(torch.device(device)), step_closure=counted)
    step_s, forward_s, inference_mb, peak_mb = (timing[k] for k in ("step_s", "forward_s", "inference_mb", "peak_mb"))
    return {"optimizer": name, "grade": OPTIMIZERS[name].grade,  # type: ignore[attr-defined]
            "forward_s": forward_s, "step_s": step_s, "step_over_forward": step_s / forward_s,
            "forwards_per_step": forwards / steps, "inference_mb": inference_mb, "peak_mb": peak_mb,
            "peak_over_inference": peak_mb / inference_mb, "steps": steps,
            "device": device, "threads": torch.get_num_threads()}


def in_child(module: str, args: list[str], what: str) -> dict[str, Any]:
    """`python -m module args` in a fresh process (peak memory is per process, and no measurement inherits
    another's allocations); its last stdout line, as JSON."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         env=os.environ | {"HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    if out.returncode != 0:
        sys.exit(f"error: {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_optimizers(names: list[str]) -> None:
    from unlearn.optim.protocol import OPTIMIZERS

    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        sys.exit(f"error: unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(sorted(OPTIMIZERS))}")


def publish(text: str, markdown: Path | None) -> None:
    """The table on stdout, and in `markdown` when given."""
    print(text)
    if markdown:
        markdown.write_text(text + "\n")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| optimizer | grade | forwards/step | s/step | s/forward | step ÷ forward | peak MB | "
             "inference MB | peak ÷ inference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['grade']} | {r['forwards_per_step']:.1f} | {r['step_s']:.3f} | "
                     f"{r['forward_s']:.3f} | **{r['step_over_forward']:.2f}×** | {r['peak_mb']:.0f} | "
                     f"{r['inference_mb']:.0f} | **{r['peak_over_inference']:.3f}×** |")
    return "\n".join(lines)


def main() -> None:
    from unlearn.optim.protocol import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="*", default=None, help="optimizer names (default: all registered)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per optimizer, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference forwards")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        steps = STEPS.get(args.child, args.steps)
        print(json.dumps(measure(args.child, steps, args.model, args.device, args.repeats)))
        return
    names = args.optimizers or sorted(OPTIMIZERS)
    check_optimizers(names)
    rows = []
    for name in names:
        # One process per optimizer: peak memory is per process, and none inherits another's allocations.
        rows.append(in_child("unlearn.perf.optimizer_cost", ["--child", name, "--steps", str(args.steps),
                                                             "--repeats", str(args.repeats), "--model", args.model,
                                                             "--device", args.device], name))
        r = rows[-1]
        print(f"{name:12s} step/forward {r['step_over_forward']:.2f}x  peak/inference {r['peak_over_inference']:.3f}x",
              file=sys.stderr, flush=True)
    publish(table(rows), args.markdown)


if __name__ == "__main__":
    main()

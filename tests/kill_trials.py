"""kill -9 at random points during `unlearn run` and `unlearn attack`, then check what is on disk.

    python -m tests.kill_trials --trials 10 [--seed 0] [--keep DIR]

Each trial starts a real `unlearn` process on a tiny random model, kills it with SIGKILL after a random delay
(drawn over the whole length of an undisturbed command, so the kill lands anywhere: start-up, model loading,
training, saving, renaming), and checks that:
  1. the folder the command writes is either absent or complete (a run: config.yaml, metrics.json, model/ with
     its weights and the toolkit marker; an attack: its metrics.json), never half-written;
  2. the next command into the same folder succeeds, removes whatever the killed one left (staging folders,
     lock files) and says so when there was something to remove.
Trials alternate between `run` and `attack --quantize rtn4`.

    python -m tests.kill_trials --races 10

Race trials pause (SIGSTOP) an `eval --run` or an `attack --run` of a run at a random point of its length, or
0-1.5 s after it takes the run's lock if that comes first (so most pauses land while it reads the run), give
`run --overwrite` of that run meanwhile (with other steps and seed, so it is another model), then let the reader
go on. Each passes when both commands end in 0 or a one-line refusal (exit 2), the run folder is complete, and what
is on disk is one run's: an undisturbed eval (attack) of the run now there gives the metrics that metrics.json
(the attack's record) holds. Exit code 0 only if every trial passes. `tests/test_safety.py` runs a few of each
inside the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TINY_BENCH = ["--set", "benchmark.people=[2,2,4]", "--set", "benchmark.cities=[1,1,2]",
              "--set", "benchmark.organizations=[1,1,2]", "--set", "benchmark.prepare.epochs=1",
              "--set", "eval.max_new_tokens=4"]
LEFTOVER_PREFIXES = (".staging-", ".trash-")


@dataclass
class Trial:
    kind: str
    delay: float
    finished_before_kill: bool
    state_after_kill: str  # "absent", "complete" or what was wrong
    leftovers_after_kill: list[str]
    next_ok: bool
    leftovers_after_next: list[str]
    reported: bool

    @property
    def passed(self) -> bool:
        reported_ok = self.reported or not any(n.startswith(LEFTOVER_PREFIXES) for n in self.leftovers_after_kill)
        return (self.state_after_kill in ("absent", "complete") and self.next_ok
                and not self.leftovers_after_next and reported_ok)


def _command(args: list[str], cwd: Path) -> list[str]:
    return [sys.executable, "-m", "unlearn", *args]


def _env(cwd: Path) -> dict[str, str]:
    env = {**os.environ, "UNLEARN_CACHE": str(cwd / "cache"), "UNLEARN_THREADS": "1"}
    env.pop("UNLEARN_DEBUG", None)
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args, cwd), cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=600)


def run_args(model: Path, name: str, steps: int = 20, seed: int = 0) -> list[str]:
    return ["run", "--method", "npo", "--optimizer", "adamw", "--model", str(model), "--steps", str(steps),
            "--batch-size", "2", "--seed", str(seed), "--name", name, "--overwrite", "-q", *TINY_BENCH]


ATTACK_ARGS = ["attack", "--run", "runs/base", "--quantize", "rtn4", "-q"]
EVAL_ARGS = ["eval", "--run", "runs/base", "-q"]


def _leftovers(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(LEFTOVER_PREFIXES) or
                  (p.name.startswith(".") and p.name.endswith(".lock")))


def run_state(folder: Path) -> str:
    if not folder.exists():
        return "absent"
    missing = [f for f in (".unlearn", "config.yaml", "metrics.json", "model/config.json", "model/model.safetensors")
               if not (folder / f).is_file()]
    if missing:
        return "incomplete: missing " + ", ".join(missing)
    try:
        json.loads((folder / "metrics.json").read_text())["metrics"]
    except (ValueError, KeyError) as err:
        return f"incomplete: metrics.json unreadable ({err})"
    return "complete"


def attack_state(folder: Path) -> str:
    if not folder.exists():
        return "absent"
    try:
        json.loads((folder / "metrics.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError) as err:
        return f"incomplete: metrics.json unreadable ({err})"
    return "complete"


def duration(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = _run(args, cwd)
    if result.returncode != 0:
        raise SystemExit(f"the undisturbed command failed: {result.stderr.strip()}")
    return time.perf_counter() - started


def trial(kind: str, delay: float, model: Path, cwd: Path, index: int) -> Trial:
    """A run trial writes a new run folder; an attack trial replaces the result an earlier attack wrote."""
    runs = cwd / "runs"
    if kind == "run":
        args, folder, parent = run_args(model, f"victim-{index}"), runs / f"victim-{index}", runs
    else:
        args, folder, parent = ATTACK_ARGS, runs / "base" / "attacks" / "rtn-4bit-channel", runs / "base" / "attacks"
    proc = subprocess.Popen(_command(args, cwd), cwd=cwd, env=_env(cwd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = (run_state if kind == "run" else attack_state)(folder)
    if kind == "attack" and run_state(runs / "base") != "complete":
        state = "the attacked run folder itself was damaged: " + run_state(runs / "base")
    left = _leftovers(parent)
    following = _run(args, cwd)  # the next command into the same folder
    after = _leftovers(parent)
    reported = "removed" in following.stdout + following.stderr
    return Trial(kind, round(delay, 2), finished, state, left, following.returncode == 0, after, reported)


@dataclass
class Race:
    reader: str
    delay: float
    reader_code: int
    writer_code: int
    state: str  # "complete" or what was wrong with the run folder
    consistent: str  # "yes", or what disagreed

    @property
    def passed(self) -> bool:
        return (self.reader_code in (0, 2) and self.writer_code in (0, 2) and self.state == "complete"
                and self.consistent == "yes")


def _metrics(path: Path) -> dict[str, float] | None:
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def _same(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(
        abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) for k in a)


def _difference(recorded: dict[str, float] | None, measured: dict[str, float] | None) -> str:
    if recorded is None or measured is None:
        return f"NO: recorded {'nothing' if recorded is None else 'metrics'}, measured " \
               f"{'nothing' if measured is None else 'metrics'}"
    keys = sorted(k for k in recorded.keys() | measured.keys() if not _same({k: recorded.get(k, math.nan)},
                                                                             {k: measured.get(k, math.nan)}))
    return (f"NO: {len(keys)} metrics differ from an undisturbed measurement, e.g. {keys[0]} "
            f"{recorded.get(keys[0])} recorded, {measured.get(keys[0])} measured")


def race(reader: str, delay: float, model: Path, cwd: Path, index: int, within: float) -> Race:
    """Pause a reader of runs/base, overwrite runs/base with another model meanwhile, resume it. The pause comes
    `within` s after the reader took the run's lock, or after `delay` s if it never takes one (as before readers
    held runs), so most pauses land while it reads: the window the race is about."""
    base = cwd / "runs" / "base"
    args = EVAL_ARGS if reader == "eval" else ATTACK_ARGS
    proc = subprocess.Popen(_command(args, cwd), cwd=cwd, env=_env(cwd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started, lock = time.monotonic(), base.parent / ".base.lock"
    while time.monotonic() - started < delay and proc.poll() is None and not lock.exists():
        time.sleep(0.005)
    if lock.exists():
        time.sleep(within)
    delay = time.monotonic() - started
    paused = proc.poll() is None
    if paused:
        proc.send_signal(signal.SIGSTOP)
    try:
        writer = _run(run_args(model, "base", steps=10 + 10 * (index % 2), seed=index), cwd)
    finally:
        if paused:
            proc.send_signal(signal.SIGCONT)
        proc.wait()
    if writer.returncode == 2 and len(writer.stderr.strip().splitlines()) != 1:
        return Race(reader, round(delay, 2), proc.returncode, -1, run_state(base), "the refusal was not one line")
    state = run_state(base)
    # What is on disk must be one run's: measured again, undisturbed, it gives the same numbers.
    if reader == "eval":
        recorded = _metrics(base / "metrics.json")
        again = _run(EVAL_ARGS, cwd)
        measured = _metrics(base / "metrics.json") if again.returncode == 0 else None
    else:
        result = base / "attacks" / "rtn-4bit-channel" / "metrics.json"
        if not result.exists():
            return Race(reader, round(delay, 2), proc.returncode, writer.returncode, state, "yes")
        recorded = _metrics(result)
        again = _run(ATTACK_ARGS, cwd)
        measured = _metrics(result) if again.returncode == 0 else None
    consistent = "yes" if _same(recorded, measured) else _difference(recorded, measured)
    return Race(reader, round(delay, 2), proc.returncode, writer.returncode, state, consistent)


def make_tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers.utils import logging as hf_logging

    from tests.conftest import make_model, make_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = make_tokenizer()
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--races", type=int, default=0, help="race trials: eval or attack against an overwrite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = args.keep or Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        model = make_tiny_model(cwd / "tiny-model")
        # Undisturbed lengths (the first run also builds the cached target model, so it is not timed).
        if _run(run_args(model, "base"), cwd).returncode != 0:
            raise SystemExit("could not make the base run")
        lengths = {"run": duration(run_args(model, "victim-0"), cwd), "attack": duration(ATTACK_ARGS, cwd)}
        if args.races:
            lengths["eval"] = duration(EVAL_ARGS, cwd)
        print("undisturbed: " + ", ".join(f"{k} {v:.1f} s" for k, v in lengths.items()))
        results = []
        for i in range(args.trials):
            kind = "run" if i % 2 == 0 else "attack"
            result = trial(kind, rng.uniform(0.2, lengths[kind] * 1.05), model, cwd, i + 1)
            results.append(result)
            print(f"trial {i + 1:2d} {kind:6s} kill at {result.delay:5.2f} s"
                  f"{' (had finished)' if result.finished_before_kill else ''}: {result.state_after_kill}; "
                  f"left {result.leftovers_after_kill or 'nothing'}; next command "
                  f"{'ok' if result.next_ok else 'FAILED'}"
                  f"{', reported the removal' if result.reported else ''}; "
                  f"after it {result.leftovers_after_next or 'clean'}"
                  f" -> {'pass' if result.passed else 'FAIL'}")
        races = []
        for i in range(args.races):
            reader = "eval" if i % 2 == 0 else "attack"
            outcome = race(reader, rng.uniform(0.2, lengths[reader] * 1.05), model, cwd, i + 1, rng.uniform(0.0, 1.5))
            races.append(outcome)
            print(f"race {i + 1:2d} {reader:6s} paused at {outcome.delay:5.2f} s: reader exit {outcome.reader_code}, "
                  f"overwrite exit {outcome.writer_code}; run {outcome.state}; one run's results: "
                  f"{outcome.consistent} -> {'pass' if outcome.passed else 'FAIL'}")
        failed = sum(not r.passed for r in [*results, *races])
        total = len(results) + len(races)
        print(f"{total - failed}/{total} trials passed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

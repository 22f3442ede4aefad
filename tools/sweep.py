"""Run a list of `unlearn run` settings one after another and tabulate what they reached (resumable).

    python tools/sweep.py SWEEP.yaml [--runs DIR] [--only NAME ...]

SWEEP.yaml is a list of {name: ..., args: "<unlearn run flags>", attacks: ["--quantize 4bit", "--relearn"]}.
A run whose folder already holds metrics.json is not run again (nor an attack whose folder exists), so an
interrupted sweep continues where it stopped. The table gives, per run: forget / retain MCQ accuracy, retain
perplexity over the starting model's, training seconds, rolled-back and clipped steps (from log.jsonl), the
collapse flag, and each attack's recovery ratio.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ATTACK_FOLDERS = {"--quantize 4bit": "bnb-4bit-nf4", "--relearn": "relearn"}


def _run(cmd: list[str]) -> int:
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def read_log(log: Path) -> list[dict]:
    """The run's log.jsonl, one record per step (none if the run has no log)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _log_counts(records: list[dict]) -> dict[str, float]:
    counts = {"rolled_back": 0.0, "clipped": 0.0}
    for record in records:
        diag = record.get("optimizer") or {}
        for key in counts:
            counts[key] += float(diag.get(key, 0.0))
    return counts


def zo_block_rises(records: list[dict]) -> list[float]:
    """Per zeroth-order block of a hybrid run: the retain part's relative change over the block, the mean of the
    block's second half against the mean of its first half. Both halves are measured at ZO steps (a first-order
    step logs its loss before its update, so comparing with the steps before the block would charge the last FO
    updates to the ZO block); each step's retain part comes from that step's own retain batch, so the change of
    one block carries batch noise — the table beside it gives that noise."""
    retain = [r["parts"].get("retain") for r in records]
    zo = [r.get("grade") == "zeroth-order" for r in records]
    if all(zo):  # a pure zeroth-order run (or no log) has no blocks: its whole-run change is not a block's
        return []
    rises, start = [], None
    for i, is_zo in enumerate([*zo, False]):
        if is_zo and start is None:
            start = i
        elif not is_zo and start is not None:
            block = retain[start:i]
            half = len(block) // 2
            first, second = block[:half], block[half:]
            if half and None not in block and sum(first) > 0:
                rises.append((sum(second) / len(second)) / (sum(first) / len(first)) - 1)
            start = None
    return rises


def zo_block_probe_changes(records: list[dict]) -> list[float]:
    """Per zeroth-order block of a hybrid run: the retain part's relative change over the block on the fixed
    probe rows (`probe` before the block's first step against the next `probe`, or `probe_end` after the last
    step), so no batch noise and no first-order update is charged to the block."""
    points = []  # (is the step after this probe zeroth-order, retain part on the probe rows)
    for record in records:
        if "probe" in record:
            points.append((record.get("grade") == "zeroth-order", record["probe"]["retain"]))
        if "probe_end" in record:
            points.append((False, record["probe_end"]["retain"]))
    pairs = zip(points[:-1], points[1:], strict=True)
    return [after / before - 1 for (zo, before), (_, after) in pairs if zo and before > 0]


def summary(runs: Path, names: list[str]) -> str:
    head = ("| run | forget | retain | ppl / target | train s | rolled back | clipped | collapsed | 4-bit rec. "
            "| relearn rec. | ZO-block retain change (step batches) | (fixed probe rows) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        path = runs / name / "metrics.json"
        if not path.is_file():
            lines.append(f"| {name} | (not run) |")
            continue
        record = json.loads(path.read_text())
        m, t = record["metrics"], record.get("target", {})
        ppl = m.get("retain/perplexity", float("nan")) / t.get("retain/perplexity", float("nan"))
        log = read_log(runs / name / "log.jsonl")  # read once for every column that needs it
        counts = _log_counts(log)
        recs = []
        for folder in ATTACK_FOLDERS.values():
            attack = runs / name / "attacks" / folder / "metrics.json"
            ratio = json.loads(attack.read_text()).get("recovery", {}).get("ratio") if attack.is_file() else None
            recs.append("—" if ratio is None else f"{ratio:.3f}")
        forget, retain = m.get("forget/mcq_acc", float("nan")), m.get("retain/mcq_acc", float("nan"))
        lines.append(f"| {name} | {forget:.3f} | {retain:.3f} | {ppl:.2f} | {record['train'].get('seconds', 0):.0f}"
                     f" | {counts['rolled_back']:.0f} | {counts['clipped']:.0f}"
                     f" | {'yes' if record.get('collapsed') else 'no'} | {' | '.join(recs)} | "
                     + (" ".join(f"{r:+.0%}" for r in zo_block_rises(log)) or "—") + " | "
                     + (" ".join(f"{r:+.0%}" for r in zo_block_probe_changes(log)) or "—")
                     + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    entries = yaml.safe_load(args.sweep.read_text())
    names = [e["name"] for e in entries if not args.only or e["name"] in args.only]
    if not args.table:
        for entry in entries:
            if entry["name"] not in names:
                continue
            folder = args.runs / entry["name"]
            if not (folder / "metrics.json").is_file():
                _run(["unlearn", "run", "--name", entry["name"], "--output-dir", str(args.runs), "--overwrite",
                      *shlex.split(entry.get("args", ""))])
            for attack in entry.get("attacks", []):
                done = (folder / "attacks" / ATTACK_FOLDERS[attack]).is_dir()
                if (folder / "metrics.json").is_file() and not done:
                    _run(["unlearn", "attack", "--run", str(folder), *shlex.split(attack)])
            print(summary(args.runs, names), flush=True)
    print(summary(args.runs, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

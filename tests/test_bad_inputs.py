"""Fuzz-style table of bad inputs through the real CLI entry point (`unlearn.cli.main`).

Every row must end with exit code 2, exactly one `error: …` line on stderr naming the problem, no traceback,
and the working folder exactly as it was (no run folder, no staging folder, no lock file left behind).
The calls run in-process: the same `main()` the `unlearn` script runs, without paying a Python start-up per
row (a few rows go through a real subprocess in test_safety.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import TINY_BENCH, call_main

RUN = ["run", "--method", "npo", "--optimizer", "adamw"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Files the rows point at: broken configs, data and model folders, a file where a folder should be."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "latin1.yaml").write_bytes("train:\n  seed: 0  # caf\xe9\n".encode("latin-1"))
    (root / "broken.yaml").write_text("train: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "remote.yaml").write_text("trust_remote_code: true\n")
    (root / "numeric-key.yaml").write_text("1: x\nnull: y\n")
    (root / "newline-key.yaml").write_text('train:\n  "a\\nb": 1\n')
    (root / "latin1.jsonl").write_bytes('{"question": "caf\xe9?", "choices": ["a","b","c","d"], "answer": 0}\n'
                                        .encode("latin-1"))
    (root / "good.jsonl").write_text('{"question": "Why?", "choices": ["a", "b", "c", "d"], "answer": 0}\n')
    (root / "a-file").write_text("not a folder\n")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (no_weights / "pytorch_model.bin").write_bytes(b"\x80\x02pickled")
    truncated = root / "truncated"
    truncated.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    bad_json = root / "bad-json-model"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes(b"")
    run = root / "runs-in" / "broken-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "config.yaml").write_bytes(b"benchmark: \xff\xfe\n")
    report = root / "report-runs"
    for name, text in (("not-object", "[]"), ("bad-metric", '{"metrics": {"forget/mcq_acc": "high"}}'),
                       ("bad-json", "{")):
        (report / name).mkdir(parents=True)
        (report / name / "metrics.json").write_text(text)
    # Hostile inputs (issue 30): an alias bomb, nesting 100,000 deep, names that are paths, FIFOs.
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        laughs.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (root / "bomb.yaml").write_text("\n".join(laughs) + "\n")
    (root / "bomb-subject.yaml").write_text("benchmark:\n  name: wmdp\n  subject:\n"
                                            + "".join(f"    {line}\n" for line in laughs))
    deep = "[" * 100_000 + "]" * 100_000
    (root / "deep.jsonl").write_text(deep + "\n")
    (root / "secret").mkdir()
    (root / "secret" / "x.yaml").write_text("run:\n  train: {max_steps: hunter2}\n")
    (root / "path-method.yaml").write_text(f"method: {{name: {root}/secret/x}}\n")
    (root / "choices-27.jsonl").write_text(json.dumps({"question": "Q?", "choices": [str(i) for i in range(27)],
                                                       "answer": 0}) + "\n")
    (root / "big-seed.yaml").write_text("seeds: [99999999999999999999999]\nmethods: {npo: null}\n"
                                        "optimizers: {adamw: {}}\n")
    os.mkfifo(root / "fifo.yaml")
    os.mkfifo(root / "fifo.jsonl")
    (root / "a-folder").mkdir()
    received = root / "received"
    for name, files in (("bomb", {"config.yaml": "\n".join(laughs) + "\n"}),
                        ("deep-metrics", {"config.yaml": "benchmark: {name: embedded}\n", "metrics.json": deep}),
                        ("deep-items", {"config.yaml": "benchmark: {name: embedded}\n", "metrics.json": "{}",
                                        "items.json": '{"a": ' * 50_000 + "1" + "}" * 50_000})):
        (received / name / "model").mkdir(parents=True)
        (received / name / "model" / "config.json").write_text("{}")
        for file, text in files.items():
            (received / name / file).write_text(text)
    deep_report = root / "deep-report" / "run"
    deep_report.mkdir(parents=True)
    (deep_report / "metrics.json").write_text(deep)
    return {"root": root, "tiny": tiny_model_dir, "no_weights": no_weights, "truncated": truncated,
            "bad_json": bad_json, "run": run, "report": report, "received": received}


# (arguments, text the one error line must contain); "{root}" / "{tiny}" / ... are filled from `world`.
CASES: list[tuple[list[str], str]] = [
    # train.* and eval.*: types and ranges, all before any model is loaded
    ([*RUN, "--batch-size", "0"], "train.batch_size must be an integer >= 1, got 0"),
    ([*RUN, "--steps", "0"], "train.max_steps must be an integer >= 1, got 0"),
    ([*RUN, "--seed=-1"], "train.seed must be an integer >= 0 and <= 4294967295, got -1"),
    ([*RUN, "--lora-rank=-2"], "train.lora_rank must be an integer >= 0, got -2"),
    ([*RUN, "--set", "train.batch_size=1.5"], "train.batch_size must be an integer >= 1, got 1.5"),
    ([*RUN, "--set", "train.lora_rank=true"], "train.lora_rank must be an integer >= 0, got True"),
    ([*RUN, "--set", "train.max_steps.x=1"], "train.max_steps must be an integer >= 1, got {'x': 1}"),
    ([*RUN, "--set", "train=5"], "config section 'train' must be a mapping"),
    ([*RUN, "--set", "train.bogus=1"], "unknown key(s) in 'train': bogus"),
    ([*RUN, "--set", "eval.batch_size=0"], "eval.batch_size must be an integer >= 1, got 0"),
    ([*RUN, "--set", "eval.max_new_tokens=-1"], "eval.max_new_tokens must be an integer >= 1, got -1"),
    ([*RUN, "--set", "eval.engine=fast"], "unknown eval.engine 'fast'"),
    ([*RUN, "--set", "eval.openqa=maybe"], "eval.openqa must be true or false, got 'maybe'"),
    ([*RUN, "--set", "eval.judge=''"], "eval.judge must name an NLI model"),
    ([*RUN, "--set", "bogus=1"], "unknown top-level config key(s): bogus"),
    ([*RUN, "--set", "novalue"], "--set expects key.path=value"),
    # method and optimizer options
    (["run", "--method", "bogus", "--optimizer", "adamw"], "unknown method 'bogus'"),
    (["run", "--method", "npo", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    ([*RUN, "--set", "method.beta=0"], "method.beta must be a finite number > 0, got 0"),
    ([*RUN, "--set", "method.beta=abc"], "method.beta must be a finite number > 0, got 'abc'"),
    ([*RUN, "--set", "method.alpha=-1"], "method.alpha must be a finite number >= 0, got -1"),
    ([*RUN, "--set", "method.alpha=.nan"], "method.alpha must be a finite number >= 0, got nan"),
    (["run", "--method", "rmu", "--optimizer", "adamw", "--set", "method.layer=1.5"],
     "method.layer must be an integer (or null) >= 0, got 1.5"),
    ([*RUN, "--lr=-1"], "optimizer.lr must be a finite number >= 0, got -1.0"),
    ([*RUN, "--set", "optimizer.lr=abc"], "optimizer.lr must be a finite number >= 0, got 'abc'"),
    ([*RUN, "--set", "optimizer.betas=[0.9]"], "optimizer.betas must be a list of 2 numbers, got [0.9]"),
    (["run", "--method", "npo", "--optimizer", "zo", "--set", "optimizer.q=0"], "q must be an integer >= 1, got 0"),
    (["run", "--method", "npo", "--optimizer", "zo", "--set", "optimizer.direction=cauchy"],
     "direction must be one of gaussian, rademacher, sphere"),
    (["run", "--method", "npo", "--optimizer", "hybrid", "--set", "optimizer.zo.q=0"],
     "optimizer.zo.q must be an integer >= 1, got 0"),
    (["run", "--method", "npo", "--optimizer", "hybrid", "--set", "optimizer.block=0"],
     "block must be an integer >= 1, got 0"),
    # run names and output folders
    ([*RUN, "--name", "../../x"], "must be a plain folder name"),
    ([*RUN, "--name", "a/b"], "must be a plain folder name"),
    ([*RUN, "--name", "/tmp/somewhere"], "must be a plain folder name"),
    ([*RUN, "--name", "."], "must be a plain folder name"),
    ([*RUN, "--name", ".."], "must be a plain folder name"),
    ([*RUN, "--name", ""], "run name must be a non-empty string"),
    ([*RUN, "--name", ".hidden"], "must not start with '.'"),
    ([*RUN, "--name", "x" * 300], "at most 200"),
    ([*RUN, "--set", 'name="a\\0b"'], "contains a control character"),
    ([*RUN, "--output-dir", "{root}/a-file"], "output folder {root}/a-file is a file, not a folder"),
    ([*RUN, "--output-dir", "{root}/a-file/runs"], "is not writable"),
    # config files
    ([*RUN, "--config", "{root}/latin1.yaml"], "is not UTF-8 text"),
    ([*RUN, "--config", "{root}/broken.yaml"], "malformed YAML in"),
    ([*RUN, "--config", "{root}/list.yaml"], "must hold a mapping at the top level"),
    ([*RUN, "--config", "{root}/missing.yaml"], "does not exist"),
    ([*RUN, "--config", "{root}/remote.yaml"], "trust_remote_code in {root}/remote.yaml is refused"),
    ([*RUN, "--set", "trust_remote_code=true"], "trust_remote_code in --set is refused"),
    ([*RUN, "--config", "{root}/numeric-key.yaml"], "unknown top-level config key(s): 1, None"),
    ([*RUN, "--config", "{root}/newline-key.yaml"], "unknown key(s) in 'train': 'a\\nb'"),
    ([*RUN, "--set", "method.beta=" + "9" * 400], "method.beta must be a finite number > 0"),
    ([*RUN, "--set", "train.max_steps=1e400"], "train.max_steps must be an integer >= 1, got inf"),
    ([*RUN, "--name", "名" * 90], "bytes long (UTF-8); at most 200"),
    # command-line usage, as typer reports it, still one line and exit 2
    ([*RUN, "--no-such-flag"], "No such option: --no-such-flag"),
    ([*RUN, "--steps", "abc"], "Invalid value for '--steps'"),
    # benchmarks and data files
    ([*RUN, "--benchmark", "bogus"], "unknown benchmark 'bogus'"),
    ([*RUN, "--benchmark", "wmdp"], "benchmark 'wmdp' needs questions"),
    ([*RUN, "--benchmark", "wmdp", "--data", "{root}/latin1.jsonl"], "is not UTF-8 text"),
    ([*RUN, "--benchmark", "wmdp", "--data", "{root}/good.jsonl", "--set", "benchmark.chunk_words=abc"],
     "benchmark.chunk_words must be an integer"),
    ([*RUN, "--set", "benchmark.people=abc"], "benchmark.people must be a list of 3 integers"),
    ([*RUN, "--set", "benchmark.prepare.epochs=0"], "benchmark.prepare.epochs must be an integer >= 1"),
    ([*RUN, "--set", "benchmark.peple=[1,1,1]"], "unknown key(s) in benchmark 'embedded': peple"),
    # model folders
    ([*RUN, "--model", "{no_weights}", *TINY_BENCH], "has no .safetensors weights (found pytorch_model.bin"),
    ([*RUN, "--model", "{truncated}", *TINY_BENCH], "cannot load model"),
    ([*RUN, "--model", "{bad_json}", *TINY_BENCH], "cannot load"),
    ([*RUN, "--model", "{root}/a-file"], "is a file"),
    ([*RUN, "--model", "./no/such/model"], "does not exist"),
    # the cache
    ([*RUN, "--model", "{tiny}", *TINY_BENCH, "--env", "UNLEARN_CACHE={root}/a-file"],
     "cache folder {root}/a-file (UNLEARN_CACHE) is a file"),
    # eval, attack, report, example-data
    (["eval", "--run", "{root}/runs-in/missing"], "does not exist"),
    (["eval", "--run", "{run}"], "is not UTF-8 text"),
    (["eval", "--run", "{run}", "--model", "{tiny}"], "give exactly one of --run RUN_DIR or --model MODEL"),
    (["attack", "--model", "{tiny}", "--quantize", "3bit"], "unsupported --quantize '3bit'"),
    (["attack", "--model", "{tiny}", "--quantize", "4bit", "--relearn"], "choose one attack"),
    (["attack", "--model", "{tiny}", "--quantize", "rtn4", "--group-size", "0"], "attack.group_size must be"),
    (["attack", "--model", "{tiny}", "--relearn", "--steps", "0"], "attack.steps must be an integer >= 1"),
    (["attack", "--model", "{tiny}", "--relearn", "--lr=-1"], "attack.lr must be a finite number > 0"),
    (["attack", "--model", "{tiny}", "--relearn", "--batch-size", "0"], "attack.batch_size must be an integer"),
    (["attack", "--model", "{tiny}", "--relearn", "--checkpoints", "a,b"], "--checkpoints expects comma-separated"),
    (["attack", "--model", "{tiny}", "--relearn", "--checkpoints=-5"], "checkpoints must be steps >= 0"),
    (["report", "{report}/missing"], "does not exist"),
    (["report", "{report}"], "bad-json/metrics.json"),
    # hostile input (issue 30): bounded YAML and JSON, names that are not paths, seeds in range, FIFOs
    ([*RUN, "--config", "{root}/bomb.yaml"], "is refused: its aliases expand to more than 100,000 values"),
    ([*RUN, "--config", "{root}/bomb-subject.yaml"], "is refused: its aliases expand to more than 100,000 values"),
    (["eval", "--run", "{received}/bomb"], "is refused: its aliases expand to more than 100,000 values"),
    ([*RUN, "--set", "benchmark.subject=[&a [l, l, l, l, l, l, l, l, l], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
      "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], "
      "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d], [*e, *e, *e, *e, *e, *e, *e, *e, *e]]"],
     "--set 'benchmark.subject': value refused: its aliases expand to more than 100,000 values"),
    ([*RUN, "--set", "train.seed=&a [*a]"], "value refused: an alias refers to the value that contains it"),
    ([*RUN, "--set", "x." * 5000 + "y=1"], "a key has at most 16 parts, this one 5001"),
    ([*RUN, "--set", "train.seed=" + "[" * 3000 + "]" * 3000], "value refused: it nests deeper than 64 levels"),
    (["run", "--method", "{root}/secret/x", "--optimizer", "adamw"], "unknown method '{root}/secret/x'"),
    (["run", "--method", "npo", "--optimizer", "../../../../../../../../{root}/secret/x"], "unknown optimizer"),
    (["run", "--optimizer", "adamw", "--config", "{root}/path-method.yaml"], "unknown method '{root}/secret/x'"),
    (["report", "{root}/deep-report"], "metrics.json nests deeper than 64 levels"),
    (["eval", "--run", "{received}/deep-metrics"], "metrics.json nests deeper than 64 levels"),
    (["attack", "--run", "{received}/deep-metrics", "--quantize", "rtn4"], "metrics.json nests deeper than 64"),
    (["attack", "--run", "{received}/deep-items", "--quantize", "rtn4"], "items.json nests deeper than 64 levels"),
    ([*RUN, "--benchmark", "wmdp", "--data", "{root}/deep.jsonl"], "line 1 nests deeper than 64 levels"),
    ([*RUN, "--benchmark", "wmdp", "--data", "{root}/choices-27.jsonl"], "has 27 choices; at most 26"),
    ([*RUN, "--seed", "99999999999999999999999"],
     "train.seed must be an integer >= 0 and <= 4294967295, got 99999999999999999999999"),
    (["attack", "--model", "{tiny}", "--relearn", "--seed", "4294967296"], "attack.seed must be an integer"),
    (["study", "{root}/big-seed.yaml"], "study seeds must be distinct integers >= 0 and <= 4294967295"),
    (["report", "{report}", "--csv", "{root}/a-folder"], "--csv {root}/a-folder is a folder"),
    (["report", "{report}", "--csv", "{root}/nodir/x.csv"], "--csv: folder {root}/nodir does not exist"),
    (["report", "{root}/a-file"], "runs folder {root}/a-file is a file, not a folder"),
    ([*RUN, "--config", "{root}/fifo.yaml"], "config file {root}/fifo.yaml is not a regular file"),
    ([*RUN, "--benchmark", "wmdp", "--data", "{root}/fifo.jsonl"], "{root}/fifo.jsonl: not a regular file"),
    ([*RUN, "--model", "someorg/not-cached", "--env", "HF_ENDPOINT=http://127.0.0.1:9"],
     "the Hugging Face hub (http://127.0.0.1:9) cannot be reached and it is not in the local cache"),
]


def _fill(text: str, world: dict[str, Path]) -> str:
    for key, path in world.items():
        text = text.replace("{" + key + "}", str(path))
    return text


@pytest.mark.parametrize(("args", "message"), CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args, message, world, tmp_path):
    args = [_fill(a, world) for a in args]
    env = {}
    if "--env" in args:  # not a CLI option: the row sets an environment variable instead
        i = args.index("--env")
        key, _, value = args[i + 1].partition("=")
        env[key] = value
        del args[i:i + 2]
    before_world, before_here = _tree(world["root"]), _tree(tmp_path)
    code, out, err = call_main(args, tmp_path, env)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _fill(message, world) in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _tree(tmp_path) == before_here, "something was left in the working folder"
    assert _tree(world["root"]) == before_world, "a shared input folder was changed"
    assert len(lines[0]) < 1200, "an error line quotes too much of its input"


def test_a_long_value_is_quoted_in_about_200_characters(tmp_path):
    code, _, err = call_main([*RUN, "--set", "method.beta=" + "x" * 100_000], tmp_path)
    assert code == 2 and "method.beta must be a finite number > 0" in err and len(err) < 400, err[:500]


def test_the_table_is_big_enough():
    assert len(CASES) >= 100

"""Running at scale, checked on the CPU: several processes (torchrun with gloo), gradient accumulation, resume
after kill -9, gradient checkpointing, device and precision settings.

The multi-process runs pin one CPU thread per process (UNLEARN_THREADS=1) on both sides of each comparison:
a float reduction split over a different number of threads may round differently, which is not what these
tests are about.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_BENCH, assert_user_error, cli, make_model
from unlearn.compute.distributed import World
from unlearn.compute.models import enable_gradient_checkpointing
from unlearn.compute.placement import CPU_FP32, resolve
from unlearn.core.errors import UserError
from unlearn.optim.protocol import build_optimizer
from unlearn.recipes.pipeline import check_world
from unlearn.tasks.data import Encoded, split_rows
from unlearn.training.config import load_run_config, read_yaml
from unlearn.training.loop import train
from unlearn.training.methods import GradAscent, build_method

ONE_THREAD = {"UNLEARN_THREADS": "1"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _run_args(optimizer: str, name: str, model_dir: Path, *extra: str) -> list[str]:
    return ["run", "--method", "npo", "--optimizer", optimizer, "--model", str(model_dir), "--batch-size", "4",
            "--name", name, "-q", *TINY_BENCH, *extra]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNLEARN_CACHE": str(cwd / "cache"), **ONE_THREAD}
    env.pop("UNLEARN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "unlearn", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("optimizer, exact", [("zo", True), ("adamw", False)])
def test_two_processes_take_the_steps_of_one(tmp_path, tiny_model_dir, optimizer, exact):
    """2 processes x 1 micro-batch = 1 process x 2 micro-batches, for the same batch: ZO bit for bit (only scalar
    losses cross, summed in shard order), AdamW within float tolerance (gradients all-reduced). Only rank 0
    writes: one run folder, one log line per step, one cached target, nothing left behind."""
    two = _torchrun(_run_args(optimizer, "two", tiny_model_dir, "--steps", "4"), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout and two.stdout.count("| two |") == 1  # one table, from rank 0
    one = cli(*_run_args(optimizer, "one", tiny_model_dir, "--steps", "4", "--grad-accum", "2"), cwd=tmp_path,
              env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    assert sorted(p.name for p in (runs / "two").iterdir()) == [".unlearn", "config.yaml", "items.json", "log.jsonl",
                                                                  "metrics.json", "model"]
    assert len(_losses(runs / "two")) == 4
    assert [p.name for p in (tmp_path / "cache" / "targets").iterdir()] != []
    assert not [p for p in (tmp_path / "cache" / "targets").iterdir() if p.name.startswith(".")]

    a, b = _weights(runs / "two"), _weights(runs / "one")
    start = load_file(Path(read_yaml(runs / "one" / "config.yaml")["target_model"]) / "model.safetensors")
    assert any(not torch.equal(start[k], b[k]) for k in b), "the runs must have moved the weights"
    if exact:
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert _losses(runs / "two") == _losses(runs / "one")
    else:
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fsdp_shards_the_model_and_takes_the_same_steps(tmp_path, tiny_model_dir):
    """train.parallel=fsdp over 2 processes (FSDP2 on gloo): the same AdamW steps as 1 process with the same
    shards, although each rank held half of every parameter; evaluation ran on both ranks in lockstep."""
    args = _run_args("adamw", "fsdp", tiny_model_dir, "--steps", "3", "--set", "train.parallel=fsdp")
    two = _torchrun(args, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes" in two.stdout
    one = cli(*_run_args("adamw", "one", tiny_model_dir, "--steps", "3", "--grad-accum", "2"), cwd=tmp_path,
              env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    runs = tmp_path / "runs"
    a, b = _weights(runs / "fsdp"), _weights(runs / "one")
    start = load_file(Path(read_yaml(runs / "one" / "config.yaml")["target_model"]) / "model.safetensors")
    assert sorted(a) == sorted(b) and any(not torch.equal(start[k], b[k]) for k in b)
    assert not torch.equal(start["model.norm.weight"], a["model.norm.weight"])  # the non-layer weights train too
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    metrics = [json.loads((runs / n / "metrics.json").read_text())["metrics"] for n in ("fsdp", "one")]
    assert metrics[0].keys() == metrics[1].keys()


def _kill_during_training(args: list[str], cwd: Path, after_step: int) -> None:
    """Start the run in its own process and SIGKILL it once a checkpoint at or after `after_step` exists."""
    env = {**os.environ, "UNLEARN_CACHE": str(cwd / "cache"), **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-m", "unlearn", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = cwd / "runs" / ".partial-cut" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")] if checkpoints.is_dir() else []
            if steps and max(steps) >= after_step:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.parametrize("optimizer", ["zo", "adamw"])
def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, optimizer):
    steps, every = 80, 5
    kill_after = random.Random(f"resume-{optimizer}").randrange(every, steps // 2)
    full = cli(*_run_args(optimizer, "full", tiny_model_dir, "--steps", str(steps), "--save-every", str(every)),
               cwd=tmp_path, env=ONE_THREAD)
    assert full.returncode == 0, full.stderr
    assert "--resume full" in full.stdout  # the run says how it would be continued
    _kill_during_training(_run_args(optimizer, "cut", tiny_model_dir, "--steps", str(steps), "--save-every",
                                    str(every)), tmp_path, kill_after)
    runs = tmp_path / "runs"
    assert not (runs / "cut").exists() and (runs / ".partial-cut" / "checkpoints").is_dir()

    # A new run of that name does not touch the interrupted one: it goes elsewhere and says how to resume.
    other = cli(*_run_args(optimizer, "cut", tiny_model_dir, "--steps", "1"), cwd=tmp_path, env=ONE_THREAD)
    assert other.returncode == 0 and "--resume cut" in other.stdout and (runs / "cut-2").is_dir()

    resumed = cli("run", "--resume", "cut", "-q", cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming cut" in resumed.stdout
    assert not (runs / ".partial-cut").exists() and not (runs / "cut" / "checkpoints").exists()
    a, b = _weights(runs / "full"), _weights(runs / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(runs / "cut") == _losses(runs / "full")  # the log continues where the checkpoint was
    assert json.loads((runs / "cut" / "metrics.json").read_text())["train"]["steps"] == steps


def test_resume_errors(tmp_path, tiny_model_dir):
    assert_user_error(cli("run", "--resume", "nothing", cwd=tmp_path), "nothing to resume", tmp_path)
    assert_user_error(cli("run", "--resume", "x", "--steps", "3", cwd=tmp_path), "--steps cannot change", tmp_path)
    done = cli(*_run_args("zo", "done", tiny_model_dir, "--steps", "1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = cli("run", "--resume", "done", cwd=tmp_path)
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def _rows(n: int, length: int = 6) -> list[Encoded]:
    gen = random.Random(n)
    return [Encoded([gen.randrange(3, 90) for _ in range(length)], n_prompt=2) for _ in range(n)]


def test_gradient_accumulation_is_the_whole_batch(tokenizer):
    """Rows of equal length: the row-weighted mean of the micro-batches' token means is the batch's token mean,
    so SGD steps (linear in the gradient: rounding differences are not amplified as by Adam's normalization)
    with 1 or 4 micro-batches agree to float tolerance."""
    models = []
    for accum in (1, 4):
        model = make_model(len(tokenizer))
        optimizer = build_optimizer("sgd", model.named_parameters(), lr=0.5)
        train(model, GradAscent(), optimizer, _rows(8), None, pad_id=0, batch_size=8, max_steps=3, seed=0,
              progress=False, grad_accum=accum)
        models.append(model.state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-4, atol=1e-6)


def test_short_retain_batches_still_feed_every_shard(tokenizer):
    """10 forget rows and 3 retain rows in batches of 4 over 4 shards: the retain stream's batches (4, then a
    short one) leave shards without retain rows, which then take the whole retain batch."""
    model = make_model(len(tokenizer))
    optimizer = build_optimizer("adamw", model.named_parameters(), lr=1e-3)
    result = train(model, build_method("graddiff"), optimizer, _rows(10), _rows(3), pad_id=0, batch_size=4,
                   max_steps=3, seed=0, progress=False, grad_accum=4)
    assert math.isfinite(result.final_loss)


def test_shards_split_the_rows():
    rows = _rows(5)
    shards = split_rows(rows, 4)
    assert [len(s) for s in shards] == [2, 1, 1, 1] and [r for s in shards for r in s] == rows
    assert [len(s) for s in split_rows(rows[:2], 4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("optimizer", ["adamw", "sophia"])  # Sophia: its Hessian products recompute layers too
def test_gradient_checkpointing_recomputes_and_changes_nothing(tokenizer, optimizer):
    counts, states = [], []
    for checkpointing in (False, True):
        model = make_model(len(tokenizer))
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls: list[int] = []
        layer = model.model.layers[0]
        # A pre-hook: recomputation in backward stops as soon as the saved tensors are rebuilt (before the
        # block returns), so a hook after the forward would not see it.
        layer.mlp.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        options = {"update_period": 1} if optimizer == "sophia" else {}
        built = build_optimizer(optimizer, model.named_parameters(), lr=1e-3, **options)
        train(model, GradAscent(), built, _rows(4), None, pad_id=0, batch_size=4, max_steps=2, seed=0,
              progress=False)
        counts.append(len(calls))
        states.append(model.state_dict())
        # Only the layer objects are in training mode (so transformers checkpoints them): no dropout anywhere.
        assert {type(m) for m in model.modules() if m.training} <= {type(layer)}
    assert counts == [2, 4] if optimizer == "adamw" else counts[1] > counts[0]  # recomputed in backward
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key])


def test_placement_on_the_cpu(tmp_path, tiny_model_dir):
    if not torch.cuda.is_available():
        assert resolve("auto", "auto") == CPU_FP32
    assert resolve("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown device"):
        resolve("tpu", "auto")
    bf16 = cli(*_run_args("adamw", "bf16", tiny_model_dir, "--steps", "2", "--dtype", "bf16"), cwd=tmp_path)
    assert bf16.returncode == 0, bf16.stderr
    assert "cpu bf16 (fp32 master weights)" in bf16.stdout
    # Saved as trained: the fp32 master weights a bf16 AdamW run adds its updates to (precision auto = master)...
    assert {t.dtype for t in _weights(tmp_path / "runs" / "bf16").values()} == {torch.float32}
    lean = cli(*_run_args("adamw", "lean", tiny_model_dir, "--steps", "2", "--dtype", "bf16", "--precision", "lean"),
               cwd=tmp_path)
    assert lean.returncode == 0, lean.stderr
    assert "cpu bf16 (bf16 weights, stochastically rounded updates)" in lean.stdout
    assert {t.dtype for t in _weights(tmp_path / "runs" / "lean").values()} == {torch.bfloat16}  # ...or bf16 ones
    saved = cli(*_run_args("adamw", "small", tiny_model_dir, "--steps", "2", "--dtype", "bf16", "--save-dtype",
                           "bf16"), cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr
    assert {t.dtype for t in _weights(tmp_path / "runs" / "small").values()} == {torch.bfloat16}
    bad = tmp_path / "bad"
    bad.mkdir()
    assert_user_error(cli(*_run_args("adamw", "x", tiny_model_dir, "--dtype", "fp8"), cwd=bad),
                      "unknown train.dtype 'fp8'", bad)


def test_what_several_processes_cannot_do():
    def check(cfg) -> None:
        check_world(cfg, World(rank=0, size=2), build_method(cfg.method["name"], **cfg.method_options))

    cfg = load_run_config("npo", "sophia", flags={"train.batch_size": 8})
    check_world(cfg, World(), build_method("npo"))
    with pytest.raises(UserError, match="optimizer 'sophia' cannot run on several processes"):
        check(cfg)
    hybrid = load_run_config("npo", "hybrid", overrides=["optimizer.fo={name: sophia}"])
    with pytest.raises(UserError, match="sophia"):
        check(hybrid)
    for method, optimizer, flags, message in (
            ("npo", "zo", {}, "optimizer 'zo' needs whole parameters"),
            ("npo", "adamw", {"train.lora_rank": 4}, "does not support train.lora_rank"),
            ("kl-retain", "adamw", {}, "method 'kl-retain' (it keeps a frozen copy of the model)"),
            ("sam-npo", "adamw", {}, "method 'sam-npo' (it shifts whole parameters)")):
        fsdp = load_run_config(method, optimizer, flags={"train.parallel": "fsdp", **flags})
        with pytest.raises(UserError, match=re.escape(message)):
            check(fsdp)
    small = load_run_config("npo", "zo", flags={"train.batch_size": 2, "train.grad_accum": 2})
    with pytest.raises(UserError, match="every micro-batch needs a row"):
        check(small)


class _Payload:
    """Pickles to a call of os.system: what a planted state.pt would run if it were unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _corrupt(partial: Path, kind: str, pwned: Path) -> None:
    checkpoint = next((partial / "checkpoints").glob("step-*"))
    state, weights, progress = (checkpoint / n for n in ("state.pt", "model.safetensors", "progress.json"))
    if kind == "pickle":
        torch.save({"optimizer": {}, "rng": _Payload(pwned)}, state)
    elif kind == "garbage":
        state.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif kind == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "progress-keys":
        progress.write_text(json.dumps({"step": 1, "stage": 0, "done": {"stages": []}}))
    elif kind == "rng":
        saved = torch.load(state, weights_only=True)
        torch.save(saved | {"rng": {"torch": "not a generator state"}}, state)


def test_broken_resume_checkpoints_are_one_line_each_and_kept(tmp_path, tiny_model_dir):
    """Corrupted `--resume` checkpoints used to end in internal errors (IndexError, SafetensorError, KeyError,
    TypeError) or a multi-line message suggesting weights_only=False. Each is one line naming the file; the
    interrupted run stays for a later resume, and a planted pickle runs nothing."""
    _kill_during_training(_run_args("adamw", "cut", tiny_model_dir, "--steps", "400", "--save-every", "1"),
                          tmp_path, 1)
    runs, pwned = tmp_path / "runs", tmp_path / "PWNED"
    kinds = {"pickle": "state.pt: not a checkpoint this toolkit wrote",
             "garbage": "state.pt: not a checkpoint this toolkit wrote",
             "truncated-weights": "model.safetensors: not the weights this run saved",
             "progress-keys": "its progress.json is malformed ('done.seconds' is missing or not a number)",
             "rng": "state.pt: it lacks the optimizer state or the random generator states"}
    for kind, message in kinds.items():
        partial = runs / f".partial-{kind}"
        shutil.copytree(runs / ".partial-cut", partial)
        _corrupt(partial, kind, pwned)
        before = sorted(str(p.relative_to(partial)) for p in partial.rglob("*"))
        result = cli("run", "--resume", kind, "-q", cwd=tmp_path, env=ONE_THREAD)
        assert result.returncode == 2, (kind, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot resume from") and message in lines[0], lines
        assert "weights_only" not in lines[0]
        assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.name != ".unlearn") == \
            [n for n in before if not n.endswith(".unlearn")], kind  # nothing lost: it can be mended and resumed
        assert not (runs / kind).exists()
    assert not pwned.exists()

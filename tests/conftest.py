"""Shared fixtures: a tiny randomly initialized Llama with a character-level tokenizer.

Everything here is seeded, so tests are deterministic and run in seconds on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import string
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unlearn.benchmarks.synthetic import SyntheticSettings
from unlearn.tasks.data import Example


def _threads() -> int:
    """This test process's share of the cores: the README's test command runs the files in two pytest-xdist
    workers, and two workers of two threads each on two cores would spend their time waiting for each other."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


THREADS = _threads()
torch.set_num_threads(THREADS)


def sigint_as_in_a_terminal() -> None:
    """A `preexec_fn` for a child that a test interrupts with SIGINT: the default disposition, as in a terminal. A
    test suite started in the background by a shell without job control (CI, nohup) inherits SIGINT ignored, its
    children too, and the toolkit rightly keeps an ignored signal ignored, so the interrupt would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def load_tool(name: str) -> ModuleType:
    """tools/NAME.py as a module: the tools are scripts, not part of the installed package."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", Path(__file__).resolve().parents[1] / "tools" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_model(vocab_size: int, seed: int = 0, layers: int = 4, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture()
def tiny(tokenizer):
    """(model, tokenizer): a fresh tiny model for each test that mutates it."""
    return make_model(len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model saved in HF format, usable as `--model DIR`."""
    folder = tmp_path_factory.mktemp("tiny-model")
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Helpers the test files share (imported from here, never from another test file).

TINY_BENCH = ["--set", "benchmark.people=[2,2,4]", "--set", "benchmark.cities=[1,1,2]",
              "--set", "benchmark.organizations=[1,1,2]", "--set", "benchmark.prepare.epochs=1",
              "--set", "eval.max_new_tokens=4"]


def cli(*args: str, cwd: Path, separate_process: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`unlearn ARGS` in `cwd`, its cache in cwd/cache (`env` adds or overrides variables). In-process by
    default: the same `main()` the `unlearn` script runs, without a Python start-up (seconds) per call;
    `separate_process` for what needs a real one."""
    env = {**os.environ, "UNLEARN_CACHE": str(cwd / "cache"), "UNLEARN_THREADS": str(THREADS), **(env or {})}
    env.pop("UNLEARN_DEBUG", None)
    if separate_process:
        return subprocess.run([sys.executable, "-m", "unlearn", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
    return _in_process(list(args), cwd, env)


def _in_process(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal

    from unlearn.cli import main

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["unlearn", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["unlearn", *args], code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, message: str, cwd: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    runs = cwd / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def call_main(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `unlearn ARGS` run in-process in `cwd`."""
    result = cli(*args, cwd=cwd, env=env)
    return result.returncode, result.stdout, result.stderr


# The embedded world at its smallest (tiny model tests).
SMALL = SyntheticSettings(people=(2, 2, 4), cities=(1, 1, 2), organizations=(1, 1, 2))

# Two forget and two retain rows for the methods' hand-computed checks.
FORGET = [Example("Question: Where was Ada born?\nAnswer:", " Zorbu"),
          Example("Question: What does Ada play?\nAnswer:", " the oboe")]
RETAIN = [Example("Question: Where was Bo born?\nAnswer:", " Quell"),
          Example("Question: What pet does Bo keep?\nAnswer:", " a ferret")]

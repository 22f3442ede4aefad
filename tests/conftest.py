"""Shared fixtures: a tiny randomly initialized Llama with a character-level tokenizer.

Everything here is seeded, so tests are deterministic and run in seconds on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import signal
import string
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


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

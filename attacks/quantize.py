"""Quantization attack: load the unlearned model quantized and see whether forgotten knowledge returns.

Unlearning often moves weights only a little; rounding them to a coarse grid can snap them back
to where the original model's weights round to (Zhang et al., 2024, "Does your LLM truly unlearn?
An embarrassingly simple approach to recover unlearned knowledge"). Two families are offered:

* bnb: bitsandbytes 4-bit (NF4 or FP4, blocks of 64, no double quantization) and 8-bit LLM.int8
  (outlier threshold 6.0) -- the transformers defaults, built by `from_pretrained(quantization_config=...)`.
  `quantize_in_memory` builds the very same layers from an already loaded float model (e.g. right
  after a relearning attack, without saving it); the tests check the logits agree exactly.
* rtn: round-to-nearest fake quantization at 2, 3, 4 or 8 bits, written here by hand (quanto offers no
  3-bit weights, and the method is a dozen lines). Weights are replaced by their dequantized values, so
  the model keeps its float dtype and all downstream code runs unchanged.
* quanto: optimum-quanto's calibration-free weight quantization, as users apply it to released models
  (transformers' QuantoConfig): int2 / int4 weights in groups of 128 input columns, int8 per output channel,
  activations left in float. It runs on the CPU and the GPU.

GPTQ and AWQ are not offered: they need calibration data and their libraries (gptqmodel, AutoAWQ) need a CUDA
build of torch (gptqmodel asks for torch >= 2.14.1 with CUDA; AutoAWQ is archived and CUDA-only).

All three families quantize the same layers: every plain `nn.Linear` (or GPT-2 style `Conv1D`) except
the ones transformers keeps in full precision -- the output head, anything tied to the embeddings,
the module holding the model's last parameter, and the model's `_keep_in_fp32_modules`.
Embeddings and norms are never quantized.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject
from unlearn.compute.models import from_pretrained, load_tokenizer, resolve
from unlearn.compute.placement import Placement, autocast_forward
from unlearn.core.errors import UserError
from unlearn.core.settings import AT_LEAST_ONE, Limit, setting

METHODS = ("bnb", "rtn", "quanto")
BITS = {"bnb": (4, 8), "rtn": (2, 3, 4, 8), "quanto": (2, 4, 8)}
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QuantSpec:
    """What to quantize to (the quantize attack's settings). `quant_type` only matters for bnb 4-bit,
    `group_size` only for rtn."""

    method: str = setting("bnb", limit=Limit(choices=METHODS))
    bits: int = 4
    quant_type: str = setting("nf4", limit=Limit(choices=QUANT_TYPES))
    group_size: int | None = setting(None, limit=AT_LEAST_ONE)  # rtn: None = per output channel, else per this
    # many input columns

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"quantization method must be one of {', '.join(METHODS)}, got '{self.method}'")
        allowed = BITS[self.method]
        if self.bits not in allowed:
            raise UserError(f"{self.method} quantization supports {', '.join(map(str, allowed))} bits, "
                            f"got {self.bits}")
        if self.quant_type not in QUANT_TYPES:
            raise UserError(f"4-bit quant type must be one of {', '.join(QUANT_TYPES)}, got '{self.quant_type}'")
        if self.group_size is not None:
            if self.method != "rtn":
                raise UserError("group size applies to rtn only (bitsandbytes uses fixed blocks of 64)")
            if self.group_size < 1:
                raise UserError(f"group size must be a positive integer, got {self.group_size}")

    @property
    def name(self) -> str:
        """Folder-friendly: bnb-4bit-nf4, bnb-8bit, rtn-3bit-g64, rtn-4bit-channel."""
        if self.method == "bnb":
            return f"bnb-{self.bits}bit" + (f"-{self.quant_type}" if self.bits == 4 else "")
        if self.method == "quanto":
            return f"quanto-{self.bits}bit"
        return f"rtn-{self.bits}bit-" + (f"g{self.group_size}" if self.group_size else "channel")


# ---------------------------------------------------------------- which layers get quantized


def _is_quantizable_type(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    # Exact type, as transformers checks: subclasses (LoRA wrappers, bnb layers) are not plain linears.
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _full_precision_names(model: nn.Module) -> set[str]:
    """Module names transformers' bitsandbytes integration leaves unquantized (its default skip list)."""
    by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor[id(param)].append(name)
    # Tied weights (a head sharing the embedding matrix): the embedding stays float, so its twin does too.
    params = [name for names in by_tensor.values() if len(names) > 1 for name in names]
    named = list(model.named_parameters())
    if named:
        params.append(named[-1][0])  # the last module is assumed to be the head, as transformers does
    skip = {p.removesuffix(".weight") for p in params}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip |= {name for name, module in model.named_modules() if head is not None and module is head}
    skip |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return skip


def _skipped(name: str, patterns: set[str]) -> bool:
    # Same rule as transformers: a pattern names the module itself, a parent (at a module boundary),
    # or a suffix of the qualified name ("wo" skips every "...DenseReluDense.wo").
    return any(name == p or name.startswith(p.rstrip(".") + ".") or name.endswith(p) for p in patterns)


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer, for every layer that `from_pretrained` with bitsandbytes would quantize."""
    skip = _full_precision_names(model)
    return {name: module for name, module in model.named_modules()
            if _is_quantizable_type(module) and not _skipped(name, skip)}


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features]; a view, so writing to it writes the layer."""
    return module.weight if type(module) is nn.Linear else module.weight.T  # Conv1D stores [in, out]


# ---------------------------------------------------------------- round-to-nearest


def _rtn_rows(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric RTN with one (scale, integer zero point) per row; returns dequantized values.

    Asymmetric because at 2-3 bits a symmetric grid wastes levels on rows whose range is skewed;
    the range is widened to include 0 so that zero stays exactly representable (the usual RTN
    baseline of the GPTQ/AWQ literature, so numbers are comparable).
    """
    levels = 2**bits - 1
    low = weight.amin(dim=1, keepdim=True).clamp(max=0)
    high = weight.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale keeps it zero
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(weight / scale) + zero, 0, levels)
    return (codes - zero) * scale


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """RTN of a [out, in] matrix per output row, or per group of `group_size` input columns.

    A trailing group narrower than `group_size` is quantized on its own, so widths that are not a
    multiple of the group size (576 in SmolLM2-135M with groups of 128) still work.
    """
    full = weight.detach().float()  # statistics in float32 even for bf16 weights
    width = full.shape[1] if group_size is None else group_size
    groups = [_rtn_rows(chunk, bits) for chunk in full.split(width, dim=1)]
    return torch.cat(groups, dim=1).to(weight.dtype)


def rtn_quantize_(model: nn.Module, bits: int, group_size: int | None = None) -> dict[str, Any]:
    """Fake-quantize, in place, the layers bitsandbytes would quantize. Returns a short summary."""
    QuantSpec("rtn", bits, group_size=group_size)  # validates bits and group size
    layers = quantizable_linears(model)
    with torch.no_grad():
        for module in layers.values():
            weight = weight_out_in(module)
            weight.copy_(fake_quantize(weight, bits, group_size))
    return {"layers": len(layers), "bits": bits, "group_size": group_size}


# ---------------------------------------------------------------- optimum-quanto


def quanto_quantize_(model: nn.Module, bits: int) -> dict[str, Any]:
    """Quantize, in place, the layers bitsandbytes would quantize, with optimum-quanto's integer weights (frozen:
    the integer codes and scales replace the float weights)."""
    QuantSpec("quanto", bits)  # validates bits
    try:
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize
    except ImportError as err:
        raise UserError(f"quanto quantization is not available here: {err} (pip install optimum-quanto)") from None
    layers = quantizable_linears(model)
    # quanto matches module names as fnmatch patterns: escape the characters it would read as wildcards.
    names = [name.replace("[", "[[]").replace("?", "[?]").replace("*", "[*]") for name in layers]
    quantize(model, weights={2: qint2, 4: qint4, 8: qint8}[bits], include=names)
    freeze(model)
    return {"layers": len(layers), "bits": bits}


# ---------------------------------------------------------------- bitsandbytes


def _bitsandbytes():
    try:
        import bitsandbytes
    except (ImportError, RuntimeError) as err:  # a broken native backend raises RuntimeError
        raise UserError(f"bitsandbytes quantization is not available here: {err}") from None
    # LLM.int8 warns on every matmul that fp32 inputs are cast to fp16 (thousands of lines per evaluation, burying
    # the progress): the cast is how int8 inference works, said once in the docs, not per call.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def _bnb_config(spec: QuantSpec, compute: torch.dtype = torch.float32):
    """The one source of the bnb settings, used by both the from_pretrained and the in-memory path. `compute`: the
    dtype 4-bit layers dequantize to and multiply in."""
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_compute_dtype=compute)


def _to_bnb(module: nn.Module, config, bnb) -> nn.Module:
    """A bnb layer holding `module`'s weights, quantized by bitsandbytes itself as from_pretrained does."""
    weight = weight_out_in(module).detach()
    out_features, in_features = weight.shape
    has_bias = module.bias is not None
    # Built on "meta" so no throwaway float weight is allocated; the real weight is assigned below and
    # quantized by the Params class's own `.to(device)`, the same call transformers' loader makes.
    if config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_bias, device="meta",
                                    has_fp16_weights=config.llm_int8_has_fp16_weight,
                                    threshold=config.llm_int8_threshold)
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                         has_fp16_weights=config.llm_int8_has_fp16_weight).to(weight.device)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, has_bias, config.bnb_4bit_compute_dtype,
                                  compress_statistics=config.bnb_4bit_use_double_quant,
                                  quant_type=config.bnb_4bit_quant_type,
                                  quant_storage=config.bnb_4bit_quant_storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                         compress_statistics=config.bnb_4bit_use_double_quant,
                                         quant_type=config.bnb_4bit_quant_type,
                                         quant_storage=config.bnb_4bit_quant_storage,
                                         module=layer).to(weight.device)
    if has_bias:
        layer.bias = module.bias
    return layer.requires_grad_(False)


def quantize_in_memory(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Quantize an already loaded float model, IN PLACE (deepcopy first to keep the float model).

    bnb gives the same layers, and so the same logits, as `from_pretrained` with the same
    quantization config on the saved weights; rtn calls `rtn_quantize_`.
    """
    spec.validate()
    if hasattr(model, "merge_and_unload"):  # a peft adapter: quantize the merged model, as saving it would
        model = model.merge_and_unload()
    if spec.method == "rtn":
        rtn_quantize_(model, spec.bits, spec.group_size)
        return model.eval()
    if spec.method == "quanto":
        quanto_quantize_(model, spec.bits)
        return model.eval()
    bnb, config = _bitsandbytes(), _bnb_config(spec)
    layers = {name: _to_bnb(module, config, bnb) for name, module in quantizable_linears(model).items()}
    _check_cpu_4bit(layers.items())  # before touching the model, so a refusal leaves it intact
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    model.is_loaded_in_4bit = spec.bits == 4  # flags transformers sets, which peft and others read
    model.is_loaded_in_8bit = spec.bits == 8
    return model.eval()


def _check_cpu_4bit(named_modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Fail now, naming the layer, rather than with a reshape error in the middle of an evaluation.

    On CPUs with AVX512-BF16, bnb repacks 4-bit weights for its fast kernel on the first eval
    forward, which needs the input width to be a multiple of the block size (64); real models are
    (SmolLM2-135M: 576, 1536), toy ones may not be. Other CPUs and GPUs have no such limit.
    """
    for name, module in named_modules:
        weight = getattr(module, "weight", None)
        if (getattr(module, "support_avx512bf16_for_cpu", False) and weight.device.type == "cpu"
                and module.in_features % weight.blocksize):
            raise UserError(f"bitsandbytes 4-bit on this CPU needs layer widths divisible by {weight.blocksize}; "
                            f"{name} has {module.in_features} inputs (use rtn, 8-bit, or a GPU)")


# ---------------------------------------------------------------- loading from a folder


def _device_map(device: torch.device | None) -> dict[str, Any] | str:
    """Where bnb puts the quantized model: the chosen GPU, else the current one when there is one, else the CPU."""
    if device is not None and device.type == "cuda":
        return {"": device}
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"


def _from_pretrained(source: str, spec_text: str, **kwargs: Any) -> nn.Module:
    return from_pretrained(source, spec_text, "model", dtype=torch.float32, **kwargs)


def load_quantized(model_dir: str | Path, spec: QuantSpec, trust_remote_code: bool = False,
                   device: torch.device | None = None, compute: torch.dtype = torch.float32) -> nn.Module:
    """Load a model folder (or hub id) quantized as `spec` says, in eval mode.

    bnb goes through transformers' own quantizing loader (on `device` if it is a GPU, else on the GPU when there
    is one, as bnb is meant to run); rtn loads the float model, rounds it in float32 and moves it to `device`.
    Evaluation then follows the model to wherever it is (`unlearn.tasks.data.on_device`). `compute` other than fp32:
    the model runs in that precision, as the run it attacks was measured (4-bit layers multiply in it, and every
    forward runs under autocast), so the attack's effect is not mixed with a change of compute precision.
    """
    spec.validate()
    source = resolve(str(model_dir))  # a missing folder or one without config.json is a UserError here
    if spec.method in ("rtn", "quanto"):  # quantized here, from the float weights (in float32)
        model = _from_pretrained(source, str(model_dir), trust_remote_code=trust_remote_code)
        if spec.method == "rtn":
            rtn_quantize_(model, spec.bits, spec.group_size)
        else:
            quanto_quantize_(model, spec.bits)
        if device is not None:
            model = model.to(device)
    else:
        _bitsandbytes()  # a clear error before transformers' longer one
        model = _from_pretrained(source, str(model_dir), quantization_config=_bnb_config(spec, compute),
                                 device_map=_device_map(device), trust_remote_code=trust_remote_code)
        _check_cpu_4bit(model.named_modules())
    if compute != torch.float32:
        where = next(model.parameters()).device
        autocast_forward(model, Placement(where, compute, "master"))
    return model.eval()


@ATTACKS.register("quantize")
class Quantize(Attack):
    """Load the model quantized (the float weights never load for bnb) and evaluate it."""

    Settings = QuantSpec
    summary = ("bitsandbytes 4-bit (NF4/FP4) or 8-bit, round-to-nearest 2/3/4/8-bit, or optimum-quanto int2/4/8; the "
               "benchmark's metrics")
    named_by = ("method", "bits", "quant_type", "group_size")
    # The short forms users know (`unlearn attack --quantize 4bit`), as (method, bits) settings of this attack.
    SHORT_FORMS = {"4bit": ("bnb", 4), "8bit": ("bnb", 8), "rtn2": ("rtn", 2), "rtn3": ("rtn", 3),
                   "rtn4": ("rtn", 4), "rtn8": ("rtn", 8), "quanto2": ("quanto", 2), "quanto4": ("quanto", 4),
                   "quanto8": ("quanto", 8)}

    @classmethod
    def short_form(cls, text: str) -> dict[str, Any]:
        """The settings `--quantize TEXT` stands for; a one-line error naming the choices otherwise."""
        if text not in cls.SHORT_FORMS:
            raise UserError(f"unsupported --quantize '{text}'; choose from: {', '.join(cls.SHORT_FORMS)}")
        method, bits = cls.SHORT_FORMS[text]
        return {"method": method, "bits": bits}

    def folder(self, settings: QuantSpec) -> str:
        return settings.name

    def run(self, subject: Subject, settings: QuantSpec, progress: bool = True) -> AttackResult:
        tokenizer, source = load_tokenizer(subject.model_spec, subject.trust_remote_code)
        model = load_quantized(source, settings, trust_remote_code=subject.trust_remote_code,
                               device=subject.placement.device, compute=subject.placement.dtype)
        metrics = subject.task.evaluate(model, tokenizer, subject.eval_settings, progress=progress)
        return AttackResult(metrics=metrics)

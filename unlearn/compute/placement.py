"""Where a model lives and in what precision: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|bf16|fp16|fp32`,
`--precision auto|master|lean|pure`.

`auto` is CUDA with bf16 where a GPU is visible (and supports bf16), else the CPU in fp32. Under a launcher that
starts one process per GPU (torchrun, `accelerate launch`), `cuda` means this process's own GPU (LOCAL_RANK).
Everything a model touches follows `model.device` (`unlearn.tasks.data.on_device`), so choosing the placement once,
at load time, is enough.

`--dtype` is the *compute* precision. What the updates are added to is `--precision`'s business: an lr-sized
step (1e-5 .. 1e-4) is below half a bf16 step of most weights (a weight of 0.05 has a bf16 step of 2.4e-4), so
weights kept in bf16 and updated by rounding to nearest do not learn. In bf16 or fp16:

* ``master``: fp32 weights and optimizer state; every forward runs under autocast in the compute dtype (what HF
  Trainer's and accelerate's bf16 mode do). 4 bytes a weight, 16 with AdamW's state and gradients.
* ``lean``: weights (and optimizer state) stored in bf16, every update computed in fp32 and stochastically rounded
  back, so each stored value is right in expectation (`unlearn.optim.rounding`). 2 bytes a weight, 8 with AdamW.
* ``pure``: weights in the compute dtype, updates rounded to nearest (what a plain ``model.to(bf16)`` does); the
  training loop's guard stops such a run when its updates round away.
* ``auto``: ``master`` for gradient grades and the hybrid, ``lean`` for zeroth-order grades (which must keep the
  memory of inference). In fp32 there is nothing to choose: weights, state and compute are fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from unlearn.core.errors import UserError, shown

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PRECISIONS = ("auto", "master", "lean", "pure")
MODES = ("fp32", "master", "lean", "pure")  # what `auto` resolves to, with fp32 when the compute dtype is fp32


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # the compute precision
    precision: str = "auto"  # as requested: one of PRECISIONS
    gradients: bool = True  # whether the optimizer that trains the model uses gradients (what `auto` depends on)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def mode(self) -> str:
        """The precision resolved: one of MODES."""
        if self.dtype == torch.float32:
            return "fp32"
        if self.precision != "auto":
            return self.precision
        return "lean" if not self.gradients and self.dtype == torch.bfloat16 else "master"

    @property
    def weights(self) -> torch.dtype:
        """The dtype the weights are stored (and updated) in."""
        return torch.float32 if self.mode in ("fp32", "master") else self.dtype

    @property
    def autocast(self) -> bool:
        """Whether forwards run under autocast: fp32 weights, compute in `dtype`."""
        return self.mode == "master"

    @property
    def stochastic(self) -> bool:
        """Whether updates to low-precision weights are stochastically rounded."""
        return self.mode == "lean"

    def for_training(self, gradients: bool) -> Placement:
        """This placement for a model trained by an optimizer that does (or does not) use gradients."""
        return replace(self, gradients=gradients)

    def describe(self) -> str:
        mode = self.mode
        if mode == "fp32":
            return f"{self.device} fp32"
        what = {"master": "fp32 master weights", "lean": "bf16 weights, stochastically rounded updates",
                "pure": "updates rounded to nearest"}[mode]
        return f"{self.device} {self.dtype_name} ({what})"


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0").strip()
    return int(value) if value.isdigit() else 0


def _parse_device(spec: str, what: str = "device") -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", the GPU index if one is given), from the spelling alone."""
    text = str(spec).strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    index = text.removeprefix("cuda").removeprefix(":")
    if not text.startswith("cuda") or (index and not index.isdigit()):
        raise UserError(f"unknown {what} {shown(spec)}; choose from: {', '.join(DEVICES)}")
    return "cuda", int(index) if index else None


def _parse_dtype(spec: str, what: str = "dtype", auto: bool = True) -> str:
    text = str(spec).strip().lower()
    if text not in (("auto", *DTYPES) if auto else DTYPES):
        raise UserError(f"unknown {what} {shown(spec)}; choose from: {'auto, ' if auto else ''}{', '.join(DTYPES)}"
                        + ("" if auto else " (or null: the precision it trained in)"))
    return text


def resolve_device(spec: str) -> torch.device:
    kind, given = _parse_device(spec)
    cuda = torch.cuda.is_available()
    if kind == "auto":
        kind = "cuda" if cuda else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not cuda:
        raise UserError(f"device {shown(spec)}: no CUDA GPU is visible to this process (use --device cpu or auto)")
    index = given if given is not None else _local_rank()  # one GPU per process under a launcher
    if index >= torch.cuda.device_count():
        raise UserError(f"device {shown(spec)}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    text = _parse_dtype(spec)
    if text == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[text]


def _parse_precision(spec: str, what: str = "precision") -> str:
    text = str(spec).strip().lower()
    if text not in PRECISIONS:
        raise UserError(f"unknown {what} {shown(spec)}; choose from: {', '.join(PRECISIONS)}")
    return text


def _check_lean(precision: str, dtype: str, what: str) -> None:
    """`lean` rounds into bf16 (in fp32 there is nothing to round): fp16 is refused with it."""
    if precision == "lean" and dtype == "fp16":
        raise UserError(f"{what} 'lean' (stochastically rounded bf16 weights) needs --dtype bf16, got fp16; use "
                        f"--precision master")


def resolve(device: str = "auto", dtype: str = "auto", precision: str = "auto") -> Placement:
    where = resolve_device(device)
    placement = Placement(where, resolve_dtype(dtype, where), _parse_precision(precision))
    _check_lean(placement.precision, placement.dtype_name, "precision")
    return placement


def check(device: str, dtype: str, save_dtype: str | None = None, section: str = "train",
          precision: str | None = None) -> None:
    """The spellings alone, without looking for a GPU: a config is checked before anything loads."""
    _parse_device(device, f"{section}.device")
    text = _parse_dtype(dtype, f"{section}.dtype")
    if save_dtype is not None:
        _parse_dtype(save_dtype, f"{section}.save_dtype", auto=False)
    if precision is not None:
        _check_lean(_parse_precision(precision, f"{section}.precision"), text, f"{section}.precision")


def autocast_forward(model: torch.nn.Module, placement: Placement) -> None:
    """Run every forward of ``model`` under autocast in the compute dtype, its outputs cast back to fp32: the
    weights stay fp32 (the master copy every update is added to), the matrix products run in bf16 or fp16.
    Patched on the instances, as accelerate's mixed precision does, so generation, peft adapters added later and
    lm-eval's calls all go through it; the decoder and the output head too, since the scorers call them
    directly (the head on chosen positions only)."""
    from accelerate.utils import convert_outputs_to_fp32

    entries = [model]
    for getter in ("get_decoder", "get_output_embeddings"):
        part = getattr(model, getter, lambda: None)()
        if isinstance(part, torch.nn.Module):
            entries.append(part)
    for module in entries:
        if getattr(module, "_unlearn_autocast", False):
            continue
        wrapped = torch.autocast(device_type=placement.device.type, dtype=placement.dtype)(module.forward)
        module.forward = convert_outputs_to_fp32(wrapped)
        module._unlearn_autocast = True


def parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[str(name).strip().lower()]

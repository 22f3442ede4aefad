"""Where a model lives and in what precision: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|bf16|fp16|fp32`.

`auto` is CUDA with bf16 where a GPU is visible (and supports bf16), else the CPU in fp32. Under a launcher that
starts one process per GPU (torchrun, `accelerate launch`), `cuda` means this process's own GPU (LOCAL_RANK).
Everything a model touches follows `model.device` (`unlearn.data.on_device`), so choosing the placement once,
at load time, is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from unlearn.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> str:
        return f"{self.device} {self.dtype_name}"


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
        raise UserError(f"unknown {what} {spec!r}; choose from: {', '.join(DEVICES)}")
    return "cuda", int(index) if index else None


def _parse_dtype(spec: str, what: str = "dtype", auto: bool = True) -> str:
    text = str(spec).strip().lower()
    if text not in (("auto", *DTYPES) if auto else DTYPES):
        raise UserError(f"unknown {what} {spec!r}; choose from: {'auto, ' if auto else ''}{', '.join(DTYPES)}"
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
        raise UserError(f"device {spec!r}: no CUDA GPU is visible to this process (use --device cpu or auto)")
    index = given if given is not None else _local_rank()  # one GPU per process under a launcher
    if index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    text = _parse_dtype(spec)
    if text == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[text]


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


def check(device: str, dtype: str, save_dtype: str | None = None, section: str = "train") -> None:
    """The spellings alone, without looking for a GPU: a config is checked before anything loads."""
    _parse_device(device, f"{section}.device")
    _parse_dtype(dtype, f"{section}.dtype")
    if save_dtype is not None:
        _parse_dtype(save_dtype, f"{section}.save_dtype", auto=False)


def parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[str(name).strip().lower()]

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


def resolve_device(spec: str) -> torch.device:
    spec = str(spec).strip().lower()
    cuda = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    index_text = spec.removeprefix("cuda").removeprefix(":")
    if not spec.startswith("cuda") or (index_text and not index_text.isdigit()):
        raise UserError(f"unknown device {spec!r}; choose from: {', '.join(DEVICES)}")
    if not cuda:
        raise UserError(f"device {spec!r}: no CUDA GPU is visible to this process (use --device cpu or auto)")
    index = int(index_text) if index_text else _local_rank()  # one GPU per process under a launcher
    if index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    spec = str(spec).strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise UserError(f"unknown dtype {spec!r}; choose from: auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


def check(device: str, dtype: str, save_dtype: str | None = None, section: str = "train") -> None:
    """The spellings alone, without looking for a GPU: a config is checked before anything loads."""
    text = str(device).strip().lower()
    index = text.removeprefix("cuda").removeprefix(":")
    if text not in ("auto", "cpu") and not (text.startswith("cuda") and (not index or index.isdigit())):
        raise UserError(f"unknown {section}.device {device!r}; choose from: {', '.join(DEVICES)}")
    if str(dtype).strip().lower() not in ("auto", *DTYPES):
        raise UserError(f"unknown {section}.dtype {dtype!r}; choose from: auto, {', '.join(DTYPES)}")
    if save_dtype is not None and str(save_dtype).strip().lower() not in DTYPES:
        raise UserError(f"unknown {section}.save_dtype {save_dtype!r}; choose from: {', '.join(DTYPES)} "
                        "(or null: the precision it trained in)")


def parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[str(name).strip().lower()]

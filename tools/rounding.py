"""How much of an unlearning update survives quantization: rounding the target and the unlearned weights alike.

    python tools/rounding.py --target TARGET_MODEL_DIR RUN_DIR [RUN_DIR ...] [--kinds nf4 fp4 int8]

A quantization attack brings knowledge back when rounding puts the unlearned weights back where the target's round
to. For every layer the attacks quantize (attacks/quantize.py: quantizable_linears), with Δ = W_unlearned −
W_target and Q the bitsandbytes round trip (4-bit NF4 / FP4 in blocks of 64, as the attack; int8: LLM.int8's
per-row absmax code):

- changed: the share of quantized weights the run moved at all;
- erased:  of those, the share whose code equals the target's code (rounding undid the move; the block's scale
           may still differ a little);
- cosine:  between the rounded update Q(W_unlearned) − Q(W_target) and Δ, pooled over the layers: 1 when the
           quantized model moved as the run did, near 0 when what is left is a few weights that crossed a bin edge
           (round-to-nearest keeps a small move's expected size, but only as rare full-bin jumps, not its shape).

Model folders are read as safetensors only; nothing in them is executed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

KINDS = ("nf4", "fp4", "int8")
Rounded = tuple[torch.Tensor, torch.Tensor]  # (the integer code of every weight, its dequantized value), flat
Round = Callable[[torch.Tensor], Rounded]


def round_trip(kind: str) -> Round:
    """Quantize a [out, in] float32 matrix as the attack's bitsandbytes layers store it; the codes and the values
    they dequantize to, in the weight's own (row-major) order."""
    import bitsandbytes.functional as bnbf

    if kind in ("nf4", "fp4"):
        def four_bit(weight: torch.Tensor) -> Rounded:
            packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=64, quant_type=kind)
            byte = packed.flatten()
            codes = torch.stack([byte >> 4, byte & 15], dim=1).flatten()[: weight.numel()]  # two weights a byte
            return codes, bnbf.dequantize_4bit(packed, state).float().flatten()
        return four_bit
    if kind == "int8":
        def eight_bit(weight: torch.Tensor) -> Rounded:
            codes, scales, _ = bnbf.int8_vectorwise_quant(weight.contiguous())
            return codes.flatten(), (codes.float() * scales.float()[:, None] / 127).flatten()
        return eight_bit
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def survival(target: dict[str, torch.Tensor], unlearned: dict[str, torch.Tensor], rounding: Round) -> dict[str, float]:
    """changed / erased / cosine (see the module doc) over every matrix the two share, pooled."""
    total = changed = erased = 0
    along = energy = rounded_energy = 0.0
    for name, before in target.items():
        delta = (unlearned[name] - before).flatten().double()
        moved = delta != 0
        codes_before, values_before = rounding(before)
        codes_after, values_after = rounding(unlearned[name])
        rounded_delta = (values_after - values_before).double()
        total += delta.numel()
        changed += int(moved.sum())
        erased += int((moved & (codes_after == codes_before)).sum())
        along += float((rounded_delta * delta).sum())
        energy += float(delta.pow(2).sum())
        rounded_energy += float(rounded_delta.pow(2).sum())
    norms = (energy * rounded_energy) ** 0.5
    return {"changed": changed / total if total else float("nan"),
            "erased": erased / changed if changed else float("nan"),
            "cosine": along / norms if norms else float("nan")}


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every matrix the quantization attack rounds, as float32 [out, in]."""
    from unlearn.attacks.quantize import quantizable_linears, weight_out_in

    return {name: weight_out_in(module).detach().float() for name, module in quantizable_linears(model).items()}


def load(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not (folder / "model.safetensors").is_file() and not any(folder.glob("model-*.safetensors")):
        raise SystemExit(f"error: {folder} holds no safetensors model")
    return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=Path, required=True, help="the starting model's folder")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (their model/ is read)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args(argv)
    target = quantized_weights(load(args.target))
    roundings = {kind: round_trip(kind) for kind in args.kinds}
    print("| run | quantization | changed | erased | cosine |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        unlearned = quantized_weights(load(run / "model"))
        if unlearned.keys() != target.keys():
            print(f"error: {run} does not have the target's layers", file=sys.stderr)
            return 2
        for kind, rounding in roundings.items():
            s = survival(target, unlearned, rounding)
            print(f"| {run.name} | {kind} | {s['changed']:.3f} | {s['erased']:.3f} | {s['cosine']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

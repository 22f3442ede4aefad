"""How step time and peak memory grow with model size, per optimizer grade, with and without gradient
checkpointing: a random Llama-style model at several widths, one fixed batch, measured side by side.

    python -m unlearn.perf.scaling                                   # widths 128 256 512 1024, default optimizers
    python -m unlearn.perf.scaling --widths 256 512 --optimizers zo adamw --markdown /tmp/scaling.md
    python -m unlearn.perf.scaling --device cuda --dtype bf16 --widths 2048 --layers 24 --vocab 49152 --mlp 4 \
        --tied --optimizers adamw zo                                     # SmolLM2-1.7B's shape, random weights

Each (width, optimizer, checkpointing) cell is one child process, as in ``unlearn.perf.optimizer_cost`` (whose
meter it uses: peak resident set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA): it builds the model
(``--layers`` decoder layers, MLP ``--mlp`` × width, ``--vocab`` tokens, ``--dtype``), a batch of ``--batch`` random
rows of ``--length`` tokens under the NPO method (forget and retain batches alike), times ``--repeats`` plain
forwards and then ``--steps`` optimizer steps after one warm-up step, interleaved. Ratios (step ÷ forward,
peak ÷ inference) are taken within one process; seconds and megabytes are printed too, so the growth with
width shows. Zeroth-order grades never run a backward pass, so checkpointing cannot change them: they are
measured once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from unlearn.perf.optimizer_cost import Meter, check_optimizers, in_child, publish, side_by_side

OPTIMIZER_NAMES = ("zo", "signsgd", "adamw", "sophia", "muon", "hybrid")
WIDTHS = (128, 256, 512, 1024)


def _placement(name: str, args: argparse.Namespace):
    """The placement a run of this optimizer takes with --dtype and --precision (unlearn.compute.placement)."""
    from unlearn.compute.placement import DTYPES, Placement
    from unlearn.optim.protocol import OPTIMIZERS

    gradients = bool(OPTIMIZERS[name].uses_gradients)  # type: ignore[attr-defined]
    return Placement(torch.device(args.device), DTYPES[args.dtype], args.precision, gradients)


def _model(width: int, args: argparse.Namespace, weights: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, width // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=width,
                         intermediate_size=(int(args.mlp * width) + 63) // 64 * 64, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(args.length, 128), tie_word_embeddings=args.tied)
    return LlamaForCausalLM(config).to(weights).eval()


def measure(name: str, width: int, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    from unlearn.compute.models import enable_gradient_checkpointing
    from unlearn.compute.placement import autocast_forward
    from unlearn.optim.protocol import OPTIMIZERS, build_optimizer
    from unlearn.optim.rounding import use_precision
    from unlearn.tasks.data import Encoded, collate
    from unlearn.training.methods import build_method

    device = torch.device(args.device)
    where = _placement(name, args)
    model = _model(width, args, where.weights).to(device)
    if where.autocast:
        autocast_forward(model, where)
    gen = torch.Generator().manual_seed(1)

    def rows() -> list[Encoded]:
        ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=gen)
        return [Encoded(r.tolist(), n_prompt=args.length // 4) for r in ids]

    forget, retain = rows(), rows()
    method = build_method("npo")
    method.prepare(model, forget, retain, 0, args.batch)
    fb = {k: v.to(device) for k, v in collate(forget, 0).items()}
    rb = {k: v.to(device) for k, v in collate(retain, 0).items()}

    def closure():
        return method(model, fb, rb)

    options: dict[str, Any] = {"block": 1, "total_steps": args.steps + 1} if name == "hybrid" else {}
    if args.draw != "pool" and OPTIMIZERS[name].grade == "zeroth-order":  # type: ignore[attr-defined]
        options["draw"] = args.draw

    def build() -> torch.optim.Optimizer:
        optimizer = build_optimizer(name, model.named_parameters(), **options)
        use_precision(optimizer, where, 0, model)  # as a `lean` run does: rounded updates, transient probes
        return optimizer

    timing = side_by_side(closure, build, args.steps,
                          args.repeats, Meter(device),
                          prepare=(lambda: enable_gradient_checkpointing(model)) if checkpointing else None)
    params = sum(p.numel() for p in model.parameters())
    step_s, forward_s, peak, inference_mb = (timing[k] for k in ("step_s", "forward_s", "peak_mb", "inference_mb"))
    grade = OPTIMIZERS[name].grade  # type: ignore[attr-defined]
    return {"optimizer": name, "grade": grade, "width": width, "params_m": params / 1e6,
            "checkpointing": checkpointing, "step_s": step_s, "forward_s": forward_s,
            "step_over_forward": step_s / forward_s, "peak_mb": peak, "inference_mb": inference_mb,
            "peak_over_inference": peak / inference_mb, "device": args.device, "threads": torch.get_num_threads(),
            "precision": where.mode}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| width | params (M) | optimizer | grade | precision | checkpointing | s/step | step ÷ forward | "
             "peak MB | peak ÷ inference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['params_m']:.1f} | {r['optimizer']} | {r['grade']} | "
                     f"{r.get('precision', '')} | {'on' if r['checkpointing'] else 'off'} | {r['step_s']:.3f} | "
                     f"{r['step_over_forward']:.2f}× | {r['peak_mb']:.0f} | {r['peak_over_inference']:.2f}× |")
    return "\n".join(lines)


# The GPU targets of issue 29 at SmolLM2-1.7B's shape (bf16): (grade, ratio key, at most).
GPU_TARGETS = (("zeroth-order", "step_over_forward", 2.2), ("zeroth-order", "peak_over_inference", 1.05),
               ("first-order", "step_over_forward", 3.5))


def target_lines(rows: list[dict[str, Any]], device: str) -> list[str]:
    """One line per measured row and GPU target it falls under: the ratio, the target and met / missed. Targets are
    about a GPU: measured elsewhere they are named, not judged."""
    if not device.startswith("cuda"):
        return [f"GPU targets (zeroth-order <= 2.2x a forward and <= 1.05x inference memory, first-order <= 3.5x a "
                f"forward) are judged on a GPU only; this ran on {device}"]
    lines = []
    for r in rows:
        for grade, key, limit in GPU_TARGETS:
            if r["grade"] == grade and not r["checkpointing"]:
                verdict = "met" if r[key] <= limit else "MISSED"
                what = "step ÷ forward" if key == "step_over_forward" else "peak ÷ inference"
                lines.append(f"target {r['optimizer']} width {r['width']}: {what} {r[key]:.2f}x (at most {limit}x): "
                             f"{verdict}")
    return lines


def main() -> None:
    from unlearn.optim.protocol import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZER_NAMES))
    parser.add_argument("--widths", nargs="*", type=int, default=list(WIDTHS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--mlp", type=float, default=8 / 3, help="MLP width ÷ model width")
    parser.add_argument("--tied", action="store_true", help="tie the input and output embeddings")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="compute precision")
    parser.add_argument("--precision", default="auto", choices=("auto", "master", "lean", "pure"),
                        help="what updates are added to (auto: master for gradient grades, lean for ZO)")
    parser.add_argument("--draw", default="pool", choices=("pool", "parameter"), help="zeroth-order directions")
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="rows per forget (and per retain) batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=3, help="timed plain forwards before the steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, width, ckpt = args.child.split(",")
        print(json.dumps(measure(name, int(width), ckpt == "1", args)))
        return
    check_optimizers(args.optimizers)
    shared = [f"--{k}={getattr(args, k)}" for k in ("layers", "vocab", "mlp", "dtype", "precision", "draw", "length",
                                                    "batch", "steps", "repeats", "device")] \
        + (["--tied"] if args.tied else [])
    rows = []
    for width in args.widths:
        for name in args.optimizers:
            modes = (False, True) if OPTIMIZERS[name].uses_gradients else (False,)  # type: ignore[attr-defined]
            for ckpt in modes:
                rows.append(in_child("unlearn.perf.scaling", [*shared, f"--child={name},{width},{int(ckpt)}"],
                                     f"{name} at width {width}"))
                r = rows[-1]
                print(f"width {width:5d} {name:8s} ckpt {'on ' if ckpt else 'off'} step {r['step_s']:.3f}s "
                      f"({r['step_over_forward']:.2f}x fwd)  peak {r['peak_mb']:.0f} MB "
                      f"({r['peak_over_inference']:.2f}x inf)", file=sys.stderr, flush=True)
    publish(table(rows), args.markdown)
    for line in target_lines(rows, args.device):
        print(line)


if __name__ == "__main__":
    main()

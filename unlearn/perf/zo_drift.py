"""How far zeroth-order probing moves the weights by itself: ZO-SGD steps at lr 0 on the whole model.

    python -m unlearn.perf.zo_drift                    # smollm2-135m, 20 steps: fp32, bf16 in place, bf16 transient
    python -m unlearn.perf.zo_drift --steps 50 --model PATH --device cuda

At lr 0 a step only probes (θ → θ + d → θ − d) and puts θ back, so every change is restore error. In fp32, probed
in place, all but a few weights come back, within one fp32 ulp. bf16 weights probed in place (rounded to nearest)
come back to a neighbouring bf16 value where a probe was rounded, and the drift adds up over steps; probed on
transient copies (`probe_without_writing`, what `--precision lean` uses) they are never written by a probe.
Printed per step: the share of weights not at their starting value, the RMS drift in bf16 steps (of max(|θ|,
0.01), so weights near zero do not dominate), and the loss on a fixed batch minus the starting loss.
"""

from __future__ import annotations

import argparse

import torch

from unlearn.compute.models import load_model
from unlearn.compute.placement import Placement
from unlearn.optim.protocol import build_optimizer
from unlearn.tasks.data import Example, collate, encode
from unlearn.tasks.scoring import mean_token_nll

TEXTS = [Example(prompt=f"Question: what is fact number {i}?\nAnswer:", target=f" Fact {i} is about {w}.")
         for i, w in enumerate(["rivers", "stars", "music", "cities", "bridges", "trees", "ships", "birds"])]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def drift(model_spec: str, dtype: torch.dtype, steps: int, device: torch.device, transient: bool) -> list[dict]:
    where = Placement(device, dtype, "lean", gradients=False)
    loaded = load_model(model_spec, placement=where)
    model, tok = loaded.model, loaded.tokenizer
    batch = {k: v.to(device) for k, v in collate([encode(tok, ex) for ex in TEXTS], tok.pad_token_id).items()}
    opt = build_optimizer("zo", model.named_parameters(), lr=0.0, seed=0)
    if where.stochastic:
        opt.round_updates(0)  # type: ignore[attr-defined]
    if transient:
        opt.probe_without_writing(model)  # type: ignore[attr-defined]
    start = _flat(model)
    unit = torch.finfo(torch.bfloat16).eps * start.abs().clamp_min(1e-2)  # a weight's bf16 step (at least 0.01's)
    with torch.no_grad():
        loss0 = float(mean_token_nll(model, batch))
    rows = []
    for step in range(1, steps + 1):
        opt.step(lambda: mean_token_nll(model, batch))
        now = _flat(model)
        with torch.no_grad():
            loss = float(mean_token_nll(model, batch))
        moved = now != start
        rows.append({"step": step, "moved": float(moved.float().mean()),
                     "rms_steps": float(((now - start) / unit).pow(2).mean().sqrt()), "loss_change": loss - loss0})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runs = {"fp32, in place": drift(args.model, torch.float32, args.steps, device, transient=False),
            "bf16, in place": drift(args.model, torch.bfloat16, args.steps, device, transient=False),
            "bf16, transient copies (lean)": drift(args.model, torch.bfloat16, args.steps, device, transient=True)}
    print("| run | step | weights not at their start | RMS drift (bf16 steps) | loss − starting loss |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        for row in rows:
            if row["step"] in (1, 5, args.steps) or row["step"] % 10 == 0:
                print(f"| {name} | {row['step']} | {row['moved']:.4f} | {row['rms_steps']:.3f} | "
                      f"{row['loss_change']:+.5f} |", flush=True)


if __name__ == "__main__":
    main()

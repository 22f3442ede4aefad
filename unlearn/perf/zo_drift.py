"""How far zeroth-order probing moves the weights by itself: ZO-SGD steps at lr 0 on the whole model.

    python -m unlearn.perf.zo_drift                    # smollm2-135m, 20 steps, fp32 and bf16 (lean) side by side
    python -m unlearn.perf.zo_drift --steps 50 --model PATH --device cuda

At lr 0 a step only probes (θ → θ + d → θ − d) and puts θ back, so every change is restore error. In fp32 the
probes restore all but a few weights, within one ulp; in bf16 (the `lean` precision: weights stored in bf16, the
update stochastically rounded) a weight whose probe was rounded comes back to a neighbouring bf16 value. Printed
per step: the share of weights not at their starting value, the RMS drift in units of each weight's bf16 step, and
the loss on a fixed batch against the starting loss, beside the size of one real update (lr 1e-3, normalized, the
shipped ZO setting) for scale.
"""

from __future__ import annotations

import argparse

import torch

from unlearn.data import Example, collate, encode
from unlearn.models import load_model
from unlearn.optim import build_optimizer
from unlearn.placement import Placement
from unlearn.scoring import mean_token_nll

TEXTS = [Example(prompt=f"Question: what is fact number {i}?\nAnswer:", target=f" Fact {i} is about {w}.")
         for i, w in enumerate(["rivers", "stars", "music", "cities", "bridges", "trees", "ships", "birds"])]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def drift(model_spec: str, dtype: torch.dtype, steps: int, device: torch.device, lr: float = 0.0) -> list[dict]:
    where = Placement(device, dtype, "lean", gradients=False)
    loaded = load_model(model_spec, placement=where)
    model, tok = loaded.model, loaded.tokenizer
    batch = {k: v.to(device) for k, v in collate([encode(tok, ex) for ex in TEXTS], tok.pad_token_id).items()}
    options = {"normalize": True, "clip": 3.0} if lr else {}
    opt = build_optimizer("zo", model.named_parameters(), lr=lr, seed=0, **options)
    if where.stochastic:
        opt.round_updates(0)  # type: ignore[attr-defined]
    start = _flat(model)
    unit = torch.finfo(torch.bfloat16).eps * start.abs().clamp_min(1e-6)  # each weight's bf16 step
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
    runs = {"fp32, lr 0": drift(args.model, torch.float32, args.steps, device),
            "bf16 lean, lr 0": drift(args.model, torch.bfloat16, args.steps, device),
            "bf16 lean, lr 1e-3 (scale)": drift(args.model, torch.bfloat16, args.steps, device, lr=1e-3)}
    print("| run | step | weights not at their start | RMS drift (bf16 steps) | loss − starting loss |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        for row in rows:
            if row["step"] in (1, 5, args.steps) or row["step"] % 10 == 0:
                print(f"| {name} | {row['step']} | {row['moved']:.4f} | {row['rms_steps']:.3f} | "
                      f"{row['loss_change']:+.5f} |", flush=True)


if __name__ == "__main__":
    main()

"""Memory of each precision mode for AdamW: bytes per weight held by weights, gradients and optimizer state.

    python -m unlearn.perf.precision_memory                      # SmolLM2-135M's shape, random weights, CPU
    python -m unlearn.perf.precision_memory --device cuda --widths 4096 --layers 32 --mlp 2.6875 --vocab 32000

Each mode takes two AdamW steps on a random batch (in bf16 compute, as `--dtype bf16 --precision MODE` runs), then
counts the bytes of the tensors it keeps: the weights, the optimizer's state, and the gradients as they stand when
the update runs (their peak). On a GPU it also prints the peak allocated memory of the step (activations
included). The last column is what those bytes come to for a 7B-parameter model (activations not included).
"""

from __future__ import annotations

import argparse

import torch

from unlearn.compute.placement import Placement, autocast_forward
from unlearn.optim.protocol import build_optimizer
from unlearn.optim.rounding import use_precision

MODES = ("fp32", "master", "lean", "pure")


def _model(width: int, layers: int, mlp: float, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * mlp),
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 192), tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def measure(mode: str, width: int, layers: int, mlp: float, vocab: int, device: torch.device,
            length: int = 128, batch: int = 2) -> dict[str, float]:
    compute = torch.float32 if mode == "fp32" else torch.bfloat16
    where = Placement(device, compute, "master" if mode == "fp32" else mode)
    model = _model(width, layers, mlp, vocab, where.weights, device)
    if where.autocast:
        autocast_forward(model, where)
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-5)
    use_precision(optimizer, where, 0)
    ids = torch.randint(0, vocab, (batch, length), device=device)
    grads = 0

    def closure() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def count_grads(p: torch.Tensor) -> None:  # after each gradient is accumulated: all of them, at the last
        nonlocal grads
        grads = max(grads, sum(q.grad.numel() * q.grad.element_size() for q in model.parameters()
                               if q.grad is not None))

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count_grads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        optimizer.step(closure)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    out = {"params": params, "weights": weights / params, "grads": grads / params, "state": state / params}
    out["total"] = out["weights"] + out["grads"] + out["state"]
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--mlp", type=float, default=1536 / 576)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print("| precision | weights B/param | gradients | AdamW state | total | 7B model (GB) |"
          + (" peak GiB |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for mode in MODES:
        m = measure(mode, args.widths, args.layers, args.mlp, args.vocab, device)
        line = (f"| {mode} | {m['weights']:.2f} | {m['grads']:.2f} | {m['state']:.2f} | {m['total']:.2f} | "
                f"{m['total'] * 7e9 / 1e9:.0f} |")
        print(line + (f" {m['peak_gib']:.2f} |" if "peak_gib" in m else ""), flush=True)


if __name__ == "__main__":
    main()

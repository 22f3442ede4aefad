"""LoRA adapters (peft) over exactly the linear layers the method trains.

Methods decide what trains (RMU: three MLP down-projections; the others: everything) by setting
``requires_grad``; wrapping then puts adapters on those linear layers only, so "unlearn through LoRA"
means the same subset as full fine-tuning would touch. The output head is never adapted (it is tied to the
input embeddings in most small models, and no unlearning method here needs it).
"""

from __future__ import annotations

import torch


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None) -> torch.nn.Module:
    """The peft model with rank-``rank`` LoRA adapters (scaling alpha / rank, default 2) on every linear
    layer whose weight currently requires grad; only the adapters train afterwards."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = sorted(name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and module is not head and module.weight.requires_grad)
    if not targets:
        raise ValueError("no trainable linear layers to put LoRA adapters on")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=targets,
                        lora_dropout=0.0)  # no dropout: zeroth-order steps need a deterministic forward
    return get_peft_model(model, config)


def merge_lora(model: torch.nn.Module, rounding_seed: int | None = None) -> torch.nn.Module:
    """The plain model with the adapters merged into their layers. Rounded to nearest, a merged update smaller than
    half a bf16 step of the base weight would be lost (the `lean` precision keeps the base in bf16): with
    ``rounding_seed`` each bf16 layer takes base + update computed in fp32, stochastically rounded back, right
    in expectation (``unlearn.optim.rounding``)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if rounding_seed is None:
        return model.merge_and_unload()
    from peft.tuners.lora import LoraLayer

    from unlearn.optim.rounding import noise_generator, stochastic_round_

    narrow: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, LoraLayer) and base is not None and base.weight.dtype == torch.bfloat16:
            narrow[name.removeprefix("base_model.model.")] = base.weight.data
            base.weight.data = base.weight.data.float()  # merged in fp32, exactly as the adapter computes it
    merged = model.merge_and_unload()
    for index, (name, stored) in enumerate(sorted(narrow.items())):
        weight = merged.get_submodule(name).weight
        stochastic_round_(stored, weight.data, noise_generator(weight.device, rounding_seed, -1, index))
        weight.data = stored
    return merged

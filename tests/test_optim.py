"""Optimizer grades behind one closure protocol: convergence, ZO estimator, exactness, errors, schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.optim import OPTIMIZERS, Hybrid, ZerothOrder, build_optimizer
from unlearn.optim.zo import estimate_gradient

NAMES = ["adamw", "hybrid", "sgd", "signsgd", "zo"]

# Per optimizer: options and steps that solve the quadratic below; all deterministic (fixed seeds).
QUADRATIC_RUNS: dict[str, tuple[dict[str, Any], int, float]] = {
    "adamw": ({"lr": 0.05, "weight_decay": 0.0}, 150, 1e-3),
    "sgd": ({"lr": 0.2}, 100, 1e-4),
    "signsgd": ({"lr": 0.01}, 150, 1e-2),
    "zo": ({"lr": 0.02, "q": 4}, 200, 1e-3),
    "hybrid": (
        {"fo": {"name": "sgd", "lr": 0.1}, "zo": {"name": "zo", "lr": 0.02, "q": 4}, "block": 5},
        100,
        1e-3,
    ),
}


def quadratic(dim: int = 10) -> tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]:
    """f(θ) = ½‖Aθ − b‖² with a reachable minimum of 0, started from θ = 0."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3 * dim, dim, generator=gen) / (3 * dim) ** 0.5 + torch.eye(3 * dim, dim)
    b = a @ torch.randn(dim, generator=gen)
    theta = torch.nn.Parameter(torch.zeros(dim))
    return theta, lambda: 0.5 * (a @ theta - b).pow(2).sum()


def test_registry_lists_every_grade() -> None:
    assert sorted(OPTIMIZERS) == NAMES
    grades = {name: cls.grade for name, cls in OPTIMIZERS.items()}  # type: ignore[attr-defined]
    assert grades == {
        "adamw": "first-order",
        "sgd": "first-order",
        "signsgd": "sign",
        "zo": "zeroth-order",
        "hybrid": "hybrid",
    }


@pytest.mark.parametrize("name", NAMES)
def test_decreases_quadratic(name: str) -> None:
    options, steps, fraction = QUADRATIC_RUNS[name]
    theta, f = quadratic()
    opt = build_optimizer(name, [theta], **options)
    initial = f().item()
    for _ in range(steps):
        loss = opt.step(f)
        assert loss.dtype == torch.float32 and not loss.requires_grad
    assert f().item() < fraction * initial
    assert theta.grad is None  # the protocol frees gradients after every step


def test_zo_estimate_points_along_gradient() -> None:
    theta, f = quadratic(dim=20)
    with torch.no_grad():
        theta.normal_(generator=torch.Generator().manual_seed(1))
    true = torch.autograd.grad(f(), theta)[0]
    estimate = estimate_gradient([theta], f, queries=2000, seed=3)[0]
    assert torch.nn.functional.cosine_similarity(estimate, true, dim=0) > 0.9


def test_zo_keeps_no_state_and_exact_restore_is_bit_exact() -> None:
    model = tiny_llama()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = ZerothOrder(params, lr=0.0, q=2, exact_restore=True)
    batch = token_batch()
    for _ in range(3):
        opt.step(lambda: model(**batch).loss)
    assert len(opt.state) == 0 and opt.forwards_per_step == 4
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_zo_in_place_restore_is_within_one_ulp() -> None:
    """Without the snapshot, restoring is exact where floats allow it and within 1 ulp elsewhere."""
    model = tiny_llama()
    zero_init = torch.nn.Parameter(torch.zeros(64))  # like LoRA B: must come back exactly
    params = [*model.parameters(), zero_init]
    before = [p.detach().clone() for p in params]
    opt = ZerothOrder(params, lr=0.0, mu=1e-3)
    opt.step(lambda: model(**token_batch()).loss)
    assert len(opt.state) == 0
    inexact, total = 0, 0
    for p, b in zip(params, before, strict=True):
        # |d| = |μz| < 8μ here; the bound is one ulp of |θ| + |d|.
        ulp = torch.nextafter(b.abs() + 8e-3, torch.tensor(float("inf"))) - (b.abs() + 8e-3)
        assert ((p - b).abs() <= ulp).all()
        inexact += int((p != b).sum())
        total += p.numel()
    assert torch.equal(zero_init, torch.zeros(64))
    assert inexact < 0.15 * total


def test_zo_state_dict_resumes_the_seed_stream() -> None:
    theta, f = quadratic()
    opt = ZerothOrder([theta], lr=0.01, seed=5)
    opt.step(f)
    saved, start = opt.state_dict(), theta.detach().clone()
    opt.step(f)
    after_one = theta.detach().clone()
    with torch.no_grad():
        theta.copy_(start)
    resumed = ZerothOrder([theta], lr=0.01, seed=99)
    resumed.load_state_dict(saved)
    resumed.step(f)
    assert torch.equal(theta, after_one)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_closure_raises(name: str) -> None:
    theta, _ = quadratic()
    with pytest.raises(ValueError, match="closure"):
        build_optimizer(name, [theta]).step()


def test_bad_names_and_options_are_one_line_value_errors() -> None:
    theta, _ = quadratic()
    with pytest.raises(ValueError) as err:
        build_optimizer("lion", [theta])
    assert str(err.value) == "unknown optimizer 'lion'; choose from: adamw, hybrid, sgd, signsgd, zo"
    for name, options in [("adamw", {"lrr": 1.0}), ("signsgd", {"betas": (0.9, 0.9)}), ("zo", {"eps": 1.0})]:
        key = next(iter(options))
        with pytest.raises(ValueError, match=f"unknown option '{key}' for optimizer '{name}'"):
            build_optimizer(name, [theta], **options)
    for name, options in [("sgd", {"lr": "1e-5"}), ("signsgd", {"lr": -1.0}), ("zo", {"q": 0})]:
        with pytest.raises(ValueError, match=f"optimizer '{name}'") as err:
            build_optimizer(name, [theta], **options)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'zo' must be a zeroth-order"):
        build_optimizer("hybrid", [theta], zo={"name": "sgd"})
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("sgd", [torch.zeros(3)])


def test_hybrid_schedule_ends_on_zo_in_blocks() -> None:
    theta, f = quadratic()
    opt = build_optimizer("hybrid", [theta], block=2, ratio=1.0, total_steps=7, zo={"name": "zo", "lr": 0.01})
    assert isinstance(opt, Hybrid)
    fo, zo = "first-order", "zeroth-order"
    expected = [fo, zo, zo, fo, fo, zo, zo]
    assert [opt.current_grade(i) for i in range(7)] == expected
    taken, lrs = [], []
    for _ in range(7):
        opt.step(f)
        taken.append(opt.last_grade)
        lrs.append(opt.param_groups[0]["lr"])
    assert taken == expected
    assert lrs == [1e-5 if g == fo else 0.01 for g in expected] and opt.lr == 0.01
    resumed = Hybrid([theta], block=2, total_steps=7)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.steps_taken == 7 and resumed.fo.state_dict()["state"].keys() == {0}
    free = Hybrid([theta], block=3, ratio=1 / 3)  # no total_steps: start with a full first-order block
    assert [free.current_grade(i) for i in range(5)] == [fo, fo, fo, zo, fo]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()  # eval: ZO needs a deterministic closure


def token_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


LLAMA_OPTIONS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-2},
    "sgd": {"lr": 1.0},
    "signsgd": {"lr": 1e-3},
    "zo": {"lr": 1e-2, "q": 2},
    "hybrid": {"fo": {"name": "adamw", "lr": 1e-2}, "block": 1, "total_steps": 4},
}


@pytest.mark.parametrize("name", NAMES)
def test_steps_on_tiny_llama(name: str) -> None:
    model = tiny_llama()
    batch = token_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, model.parameters(), **LLAMA_OPTIONS[name])
    initial = model(**batch).loss.item()
    for _ in range(4):
        loss = opt.step(lambda: model(**batch).loss)
        assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if OPTIMIZERS[name].grade in ("first-order", "sign"):  # type: ignore[attr-defined]
        assert model(**batch).loss.item() < initial


@pytest.mark.parametrize("name", NAMES)
def test_lora_only_adapters_change(name: str) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    batch = token_batch()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = build_optimizer(name, model.parameters(), **LLAMA_OPTIONS[name])
    for _ in range(2):
        opt.step(lambda: model(**batch).loss)
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)

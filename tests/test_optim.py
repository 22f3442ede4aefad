"""Optimizer grades behind one closure protocol: convergence, ZO estimator, exactness, errors, schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.optim.hybrid import Hybrid
from unlearn.optim.loss import Loss
from unlearn.optim.protocol import OPTIMIZERS, build_optimizer
from unlearn.optim.zo import ZerothOrder, ZerothOrderBase

GRADES = {
    "adamw": "first-order",
    "sgd": "first-order",
    "signsgd": "sign",
    "signum": "sign",
    "signadam": "sign",
    "sophia": "second-order",
    "muon": "spectral",
    "sift": "spectral",
    "zo": "zeroth-order",
    "zo-sign": "zeroth-order",
    "zo-adam": "zeroth-order",
    "fzoo": "zeroth-order",
    "zo-rank": "zeroth-order",
    "hizoo": "zeroth-order",
    "zo-lowrank": "zeroth-order",
    "zo-muon": "zeroth-order",
    "hybrid": "hybrid",
}
NAMES = sorted(GRADES)
ZO_NAMES = [n for n, g in GRADES.items() if g == "zeroth-order"]
MATRIX = "layers.0.mlp.down_proj.weight"  # a name SIFT selects and Muon treats as a hidden matrix

# Per optimizer: options and steps that solve the quadratic below; all deterministic (fixed seeds).
QUADRATIC_RUNS: dict[str, tuple[dict[str, Any], int, float]] = {
    "adamw": ({"lr": 0.05, "weight_decay": 0.0}, 150, 1e-3),
    "sgd": ({"lr": 0.1}, 100, 1e-4),
    "signsgd": ({"lr": 0.03}, 200, 1e-2),
    "signum": ({"lr": 0.03}, 200, 1e-2),
    "signadam": ({"lr": 0.03}, 200, 1e-2),
    "sophia": ({"lr": 0.05, "clip": 1.0}, 150, 1e-2),
    "muon": ({"lr": 0.02, "momentum": 0.5}, 150, 1e-2),
    "sift": ({"lr": 0.02, "momentum": 0.5}, 150, 1e-2),
    "zo": ({"lr": 0.02, "q": 4}, 200, 1e-2),
    "zo-sign": ({"lr": 0.02, "q": 4}, 300, 1e-2),
    "zo-adam": ({"lr": 0.05, "q": 4}, 300, 1e-2),
    "fzoo": ({"lr": 0.05, "q": 4}, 300, 1e-2),
    "zo-rank": ({"lr": 0.05, "q": 4}, 300, 1e-2),
    "hizoo": ({"lr": 0.02, "q": 4}, 200, 1e-2),
    "zo-lowrank": ({"lr": 0.01, "q": 4, "rank": 2, "refresh": 5}, 300, 1e-2),
    "zo-muon": ({"lr": 0.05, "q": 4, "rank": 2, "refresh": 5}, 400, 1e-2),
    "hybrid": (
        {"fo": {"name": "sgd", "lr": 0.1}, "zo": {"name": "zo", "lr": 0.02, "q": 4}, "block": 5},
        100,
        1e-3,
    ),
}


def quadratic(shape: tuple[int, int] = (6, 5)) -> tuple[torch.nn.Parameter, Callable[[], Loss]]:
    """f(Θ) = ½‖A₁Θ − B₁‖² + ½‖A₂Θ − B₂‖², as forget and retain parts with one common minimum of 0 (so
    SIFT sees two methods), over a matrix (so Muon and SIFT apply), started from Θ = 0."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    solution = torch.randn(rows, cols, generator=gen)
    a1 = torch.randn(2 * rows, rows, generator=gen) / (2 * rows) ** 0.5 + torch.eye(2 * rows, rows)
    a2 = torch.randn(2 * rows, rows, generator=gen) / (2 * rows) ** 0.5 + torch.eye(2 * rows, rows)
    b1, b2 = a1 @ solution, a2 @ solution
    theta = torch.nn.Parameter(torch.zeros(rows, cols))
    return theta, lambda: Loss({"forget": 0.5 * (a1 @ theta - b1).pow(2).sum(),
                                "retain": 0.5 * (a2 @ theta - b2).pow(2).sum()})


def test_registry_lists_every_grade() -> None:
    assert {name: cls.grade for name, cls in OPTIMIZERS.items()} == GRADES  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", NAMES)
def test_decreases_quadratic(name: str) -> None:
    options, steps, fraction = QUADRATIC_RUNS[name]
    theta, f = quadratic()
    opt = build_optimizer(name, [(MATRIX, theta)], **options)
    initial = float(f())
    for _ in range(steps):
        loss = opt.step(f)
        assert loss.dtype == torch.float32 and not loss.requires_grad
    assert float(f()) < fraction * initial
    assert theta.grad is None  # the protocol frees gradients after every step


def mean_step(name: str, theta: torch.nn.Parameter, f: Callable[[], Loss], seeds: int, **options: Any
              ) -> torch.Tensor:
    """The average over seeds of one step's move from the same θ (exact_restore: no rounding residue)."""
    start = theta.detach().clone()
    total = torch.zeros_like(theta)
    for seed in range(seeds):
        opt = build_optimizer(name, [(MATRIX, theta)], seed=seed, exact_restore=True, **options)
        opt.step(f)
        with torch.no_grad():
            total += theta - start
            theta.copy_(start)
    return total / seeds


@pytest.mark.parametrize(
    ("name", "options"),
    [("zo", {}), ("zo", {"direction": "rademacher"}), ("zo", {"direction": "sphere"}), ("zo", {"sided": 1}),
     ("zo-sign", {}), ("zo-adam", {}), ("fzoo", {}), ("zo-rank", {}), ("hizoo", {}),
     ("zo-lowrank", {"rank": 2, "refresh": 1}), ("zo-muon", {"rank": 2, "refresh": 1})],
)
def test_zo_estimates_point_along_the_gradient(name: str, options: dict[str, Any]) -> None:
    """Averaged over seeds, every zeroth-order step moves against the true gradient (cosine > 0.9)."""
    theta, f = quadratic()
    with torch.no_grad():
        theta.normal_(generator=torch.Generator().manual_seed(1))
    true = torch.autograd.grad(f().total, theta)[0]
    move = mean_step(name, theta, f, seeds=600, lr=1e-3, **options)
    assert torch.nn.functional.cosine_similarity(-move.flatten(), true.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("name", ZO_NAMES)
def test_zo_exact_restore_is_bit_exact_and_stateless_where_it_can_be(name: str) -> None:
    model = tiny_llama()
    params = list(model.named_parameters())
    before = [p.detach().clone() for _, p in params]
    opt = build_optimizer(name, params, lr=0.0, q=2, exact_restore=True)
    batch = token_batch()
    for _ in range(2):
        opt.step(lambda: model(**batch).loss)
    assert isinstance(opt, ZerothOrderBase)
    assert opt.forwards_per_step == {"fzoo": 3, "hizoo": 5}.get(name, 4)
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before, strict=True))
    if name in ("zo", "zo-lowrank", "zo-muon", "fzoo", "zo-rank"):  # no per-parameter state: inference-level memory
        assert all(not s for s in opt.state.values())


def test_zo_in_place_restore_is_within_one_ulp() -> None:
    """Without the snapshot, restoring is exact where floats allow it and within 1 ulp elsewhere."""
    model = tiny_llama()
    zero_init = torch.nn.Parameter(torch.zeros(64))  # like LoRA B: must come back exactly
    params = [*model.parameters(), zero_init]
    before = [p.detach().clone() for p in params]
    opt = ZerothOrder(params, lr=0.0, mu=1e-3)
    opt.step(lambda: model(**token_batch()).loss)
    assert len(opt.state) == 0 and opt.forwards_per_step == 2
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
        build_optimizer(name, [(MATRIX, theta)]).step()


def test_bad_names_and_options_are_one_line_value_errors() -> None:
    theta, _ = quadratic()
    with pytest.raises(ValueError) as err:
        build_optimizer("lion", [theta])
    assert str(err.value) == f"unknown optimizer 'lion'; choose from: {', '.join(NAMES)}"
    for name, options in [("adamw", {"lrr": 1.0}), ("signsgd", {"betas": (0.9, 0.9)}), ("zo", {"eps": 1.0})]:
        key = next(iter(options))
        with pytest.raises(ValueError, match=f"unknown key\\(s\\) in optimizer '{name}': {key} "):
            build_optimizer(name, [theta], **options)
    for name, options in [("sgd", {"lr": "1e-5"}), ("signsgd", {"lr": -1.0}), ("zo", {"q": 0}),
                          ("zo", {"direction": "cauchy"}), ("zo", {"sided": 3}), ("fzoo", {"q": 1}),
                          ("zo-lowrank", {"rank": 0}), ("sophia", {"update_period": 0}), ("signum", {"momentum": 1.5})]:
        # Types and ranges are checked against the optimizer's Settings ("optimizer.lr must be a finite number");
        # what no field says (a hybrid member's kind) by the class.
        with pytest.raises(ValueError, match=f"optimizer '{name}'|optimizer\\.{next(iter(options))} must be") as err:
            build_optimizer(name, [theta], **options)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'zo' must be a zeroth-order"):
        build_optimizer("hybrid", [theta], zo={"name": "sgd"})
    with pytest.raises(ValueError, match="'fo' must be a gradient-based"):
        build_optimizer("hybrid", [theta], fo={"name": "fzoo"})
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
    "signum": {"lr": 1e-3},
    "signadam": {"lr": 1e-3},
    "sophia": {"lr": 1e-2, "update_period": 2},
    "muon": {"lr": 2e-2, "adamw_lr": 1e-2},
    "sift": {"lr": 2e-2, "adamw_lr": 1e-2},
    "zo": {"lr": 1e-2, "q": 2},
    "zo-sign": {"lr": 1e-3},
    "zo-adam": {"lr": 1e-3},
    "fzoo": {"lr": 1e-3},
    "zo-rank": {"lr": 1e-3},
    "hizoo": {"lr": 1e-2},
    "zo-lowrank": {"lr": 1e-2, "rank": 2},
    "zo-muon": {"lr": 1e-2, "rank": 2},
    "hybrid": {"fo": {"name": "adamw", "lr": 1e-2}, "block": 1, "total_steps": 4},
}


def parts_closure(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], Loss]:
    """Like an unlearning method: a forget part (ascent on one half) and a retain part (the other)."""
    forget = {k: v[:1] for k, v in batch.items()}
    retain = {k: v[1:] for k, v in batch.items()}
    return lambda: Loss({"forget": -model(**forget).loss, "retain": model(**retain).loss})


@pytest.mark.parametrize("name", NAMES)
def test_steps_on_tiny_llama(name: str) -> None:
    model = tiny_llama()
    batch = token_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, model.named_parameters(), **LLAMA_OPTIONS[name])
    initial = model(**batch).loss.item()
    for _ in range(4):
        loss = opt.step(lambda: model(**batch).loss)
        assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if GRADES[name] in ("first-order", "sign", "second-order", "spectral"):
        assert model(**batch).loss.item() < initial


@pytest.mark.parametrize("name", NAMES)
def test_lora_only_adapters_change(name: str) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    batch = token_batch()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = build_optimizer(name, model.named_parameters(), **LLAMA_OPTIONS[name])
    closure = parts_closure(model, batch)  # named loss parts, as the methods return them
    for _ in range(2):
        assert torch.isfinite(opt.step(closure))
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def pool_vectors(monkeypatch: pytest.MonkeyPatch, kind: str, seeds: int, numel: int = 40) -> torch.Tensor:
    """z (= d/μ) for a parameter of ``numel`` elements, one row per seed, with chunks of 8 sharing a
    16-entry pool: several chunks draw from the same pool entries, as on a real model."""
    from unlearn.optim import zo_directions

    monkeypatch.setattr(zo_directions, "CHUNK", 8)
    monkeypatch.setattr(zo_directions, "POOL_SIZE", 16)
    directions = zo_directions.PoolDirections([torch.zeros(numel)], mu=1.0, kind=kind)
    rows = []
    for seed in range(seeds):
        directions.prepare([seed], 0)
        rows.append(torch.cat([d * m for d, m in (directions.direction(seed, 0, k)
                                                  for k in range(len(directions.chunks[0])))]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sphere"])
def test_pool_directions_have_identity_second_moment(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """E[z zᵀ] = I — all SPSA's unbiasedness needs — even though chunks reuse pool entries."""
    z = pool_vectors(monkeypatch, kind, seeds=20000).double()
    second = z.T @ z / len(z)
    off = second - torch.diag(torch.diagonal(second))
    assert (torch.diagonal(second) - 1).abs().max() < 0.06
    assert off.abs().max() < 0.06
    if kind == "sphere":
        assert torch.allclose(z.pow(2).sum(1), torch.full((len(z),), 40.0, dtype=torch.float64), rtol=1e-3)
    if kind == "rademacher":
        assert set(z.abs().unique().tolist()) == {1.0}


def test_random_chunk_signs_are_what_decorrelates_shared_pool_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: with the signs stripped, two chunks meet on a shared pool entry with
    probability 1/16 here, so every cross-chunk pair has E[z_i z_j] ≈ 1/16; with the signs it is 0."""
    z = pool_vectors(monkeypatch, "gaussian", seeds=20000).double()
    from unlearn.optim import zo_directions  # still patched by pool_vectors: chunks of 8, a pool of 16

    directions = zo_directions.PoolDirections([torch.zeros(40)], mu=1.0)
    unsigned_rows = []
    for seed in range(20000):
        directions.prepare([seed], 0)
        unsigned_rows.append(torch.cat([directions.direction(seed, 0, k)[0] for k in range(5)]))
    unsigned = torch.stack(unsigned_rows).double()
    cross = torch.ones(40, 40, dtype=torch.bool)
    for k in range(5):
        cross[k * 8:(k + 1) * 8, k * 8:(k + 1) * 8] = False
    assert (unsigned.T @ unsigned / len(unsigned))[cross].mean() > 0.05
    assert (z.T @ z / len(z))[cross].mean().abs() < 0.01


@pytest.mark.parametrize("name", ["zo", "zo-sign", "zo-adam", "fzoo", "zo-rank"])
def test_per_parameter_draws_solve_the_quadratic_too(name: str) -> None:
    """draw: parameter (MeZO's one draw per parameter per pass, for GPUs) is a drop-in for the pool."""
    options, steps, _ = QUADRATIC_RUNS[name]
    theta, f = quadratic()
    opt = build_optimizer(name, [(MATRIX, theta)], **options, draw="parameter")
    initial = float(f())
    for _ in range(steps):
        opt.step(f)
    assert float(f()) < 0.05 * initial  # another random stream than the pool's: the same descent, other digits


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_per_parameter_directions_have_identity_second_moment_and_regenerate(kind: str) -> None:
    from unlearn.optim.zo_directions import ParameterDirections

    params = [torch.zeros(30), torch.zeros(10)]
    dirs = ParameterDirections(params, mu=1.0, kind=kind)
    z = torch.stack([torch.cat([dirs.direction(s, 0, 0)[0], dirs.direction(s, 1, 0)[0]]) for s in range(20000)])
    second = z.double().T @ z.double() / len(z)
    assert (torch.diagonal(second) - 1).abs().max() < 0.06
    assert (second - torch.diag(torch.diagonal(second))).abs().max() < 0.06
    assert torch.equal(dirs.direction(7, 1, 0)[0], dirs.direction(7, 1, 0)[0])  # the same draw at every pass
    with pytest.raises(ValueError, match="structured directions"):
        build_optimizer("hizoo", [(MATRIX, torch.nn.Parameter(torch.zeros(6, 5)))], draw="parameter")

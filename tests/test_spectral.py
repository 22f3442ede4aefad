"""Spectral grade: Newton–Schulz, Muon's parameter split, and SIFT's two branches checked against the formulas."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn.optim.loss import Loss, LossValue
from unlearn.optim.protocol import build_optimizer
from unlearn.optim.spectral import SIFT, Muon, newton_schulz, top_singular

NAME = "layers.0.mlp.down_proj.weight"
ROWS, COLS, K = 24, 16, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen(seed))).Q


def polar(x: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def top_k(a: torch.Tensor, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], vh[:k].T


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def linear_problem(a_f: torch.Tensor, a_r: torch.Tensor | None) -> tuple[torch.nn.Parameter, Callable[[], Loss]]:
    """W and a closure with forget = ⟨A_f, W⟩ and retain = ⟨A_r, W⟩: the part gradients are A_f and A_r exactly."""
    w = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=gen(9)))

    def closure() -> Loss:
        parts = {"forget": (a_f * w).sum()}
        if a_r is not None:
            parts["retain"] = (a_r * w).sum()
        return Loss(parts)

    return w, closure


def conflicting_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly rank-K A_f, A_r with distinct singular values and clearly negative cosine: A_r's singular
    vectors are perturbations of A_f's, with the right ones negated."""
    u_f, v_f = orthonormal(ROWS, K, 1), orthonormal(COLS, K, 2)
    a_f = u_f @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v_f.T
    u_r = torch.linalg.qr(u_f + 0.25 * torch.randn(ROWS, K, generator=gen(3))).Q
    v_r = torch.linalg.qr(v_f + 0.25 * torch.randn(COLS, K, generator=gen(4))).Q
    u_r = u_r * torch.sign((u_r * u_f).sum(0))  # undo QR's column signs so u_r ≈ u_f, v_r ≈ v_f
    v_r = v_r * torch.sign((v_r * v_f).sum(0))
    a_r = -(u_r @ torch.diag(torch.tensor([2.5, 1.5, 0.7])) @ v_r.T)
    assert cosine(a_f, a_r) < -0.4
    return a_f, a_r


# ---- Newton–Schulz -------------------------------------------------------------------------------


def test_newton_schulz_orthogonalizes_approximately() -> None:
    x = torch.randn(20, 30, generator=gen(0))
    out = newton_schulz(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic does not converge to exactly 1
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    assert cosine(out, u @ vh) > 0.9
    assert torch.allclose(newton_schulz(x.T), out.T, atol=1e-6)  # tall inputs are handled transposed
    assert torch.equal(x, torch.randn(20, 30, generator=gen(0)))  # the input is left untouched
    assert newton_schulz(x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.ones(3))


# ---- Muon ----------------------------------------------------------------------------------------


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 12), generator=gen(seed))
    return {"input_ids": ids, "labels": ids}


def test_muon_splits_hidden_matrices_from_the_rest_and_descends() -> None:
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    opt = build_optimizer("muon", model.named_parameters(), lr=0.02, adamw_lr=3e-3)
    assert isinstance(opt, Muon) and opt.grade == "spectral"
    muon_names = set(opt.parts["muon"].param_groups[0]["param_names"])
    adamw_names = set(opt.parts["adamw"].param_groups[0]["param_names"])
    assert muon_names == {n for n in names if n.endswith("_proj.weight")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw_names
    assert muon_names | adamw_names == set(names) and not muon_names & adamw_names
    assert opt.param_groups[0]["lr"] == 0.02  # Muon's lr first, for logging

    data = batch(0)
    initial = model(**data).loss.item()
    for _ in range(5):
        loss = opt.step(lambda: model(**data).loss)
        assert loss.dtype == torch.float32 and not loss.requires_grad
    assert model(**data).loss.item() < initial
    assert all(p.grad is None for p in model.parameters())


def test_muon_unnamed_matrices_all_go_to_muon() -> None:
    emb, bias = torch.nn.Parameter(torch.randn(10, 4)), torch.nn.Parameter(torch.zeros(4))
    opt = Muon([emb, bias])
    assert opt.parts["muon"].param_groups[0]["params"] == [emb]
    assert opt.parts["adamw"].param_groups[0]["params"] == [bias]
    only_hidden = Muon([("layers.0.mlp.up_proj.weight", emb)])
    assert set(only_hidden.parts) == {"muon"}  # an empty group builds no sub-optimizer


def test_muon_first_step_is_the_orthogonalized_gradient() -> None:
    g = torch.randn(ROWS, COLS, generator=gen(5))
    w = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=gen(6)))
    w0 = w.detach().clone()
    opt = Muon([("layers.0.mlp.up_proj.weight", w)], lr=0.1, nesterov=False)
    opt.step(lambda: (g * w).sum())
    expected = -0.1 * math.sqrt(ROWS / COLS) * newton_schulz(g)
    step = w.detach() - w0
    assert cosine(step, expected) > 0.99  # torch's Muon iterates in bf16
    assert abs(step.norm() / expected.norm() - 1) < 0.05


# ---- SIFT ----------------------------------------------------------------------------------------


def test_sift_direction_ignores_svd_sign_flips() -> None:
    a_f, a_r = conflicting_pair()
    (u_f, v_f), (u_r, v_r) = top_k(a_f), top_k(a_r)
    u, v = torch.cat([u_r, u_f], 1), torch.cat([v_r, v_f], 1)
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])  # a column of U flips with its column of V
    assert torch.allclose(polar(u * flips) @ polar(v * flips).T, polar(u) @ polar(v).T, atol=1e-6)


def test_sift_conflict_step_is_the_joint_polar_update() -> None:
    a_f, a_r = conflicting_pair()
    w, closure = linear_problem(a_f, a_r)
    w0 = w.detach().clone()
    opt = SIFT([(NAME, w)], lr=0.1, rank=K)
    opt.step(closure)
    (u_f, v_f), (u_r, v_r) = top_k(a_f), top_k(a_r)  # first step: momentum = gradient
    direction = polar(torch.cat([u_r, u_f], 1)) @ polar(torch.cat([v_r, v_f], 1)).T
    expected = w0 - 0.1 * math.sqrt(ROWS / COLS) * direction
    assert torch.allclose(w.detach(), expected, atol=1e-5)
    assert opt.last_sift == [NAME]
    assert opt.last_conflicts[NAME] == pytest.approx(cosine(a_f, a_r), abs=1e-5)
    # Both losses go down to first order: ⟨A, ΔW⟩ < 0 for each side, though the gradients conflict.
    step = w.detach() - w0
    assert (a_f * step).sum() < 0 and (a_r * step).sum() < 0


def test_sift_without_conflict_is_muon_on_the_summed_momentum() -> None:
    a_f, _ = conflicting_pair()
    a_r = a_f + 0.3 * torch.randn(ROWS, COLS, generator=gen(7))
    w, closure = linear_problem(a_f, a_r)
    w0 = w.detach().clone()
    opt = SIFT([(NAME, w)], lr=0.1, rank=K)
    opt.step(closure)
    step = w.detach() - w0
    assert torch.allclose(step, -0.1 * math.sqrt(ROWS / COLS) * newton_schulz(a_f + a_r), atol=1e-5)
    assert opt.last_sift == [] and opt.last_conflicts[NAME] > 0
    for a in (a_f, a_r):  # the step still has a substantial component in each side's top subspace
        u, v = top_k(a)
        assert (u.T @ step @ v).norm() > 0.1 * step.norm()


def test_sift_momentum_accumulates_per_side() -> None:
    a_f, a_r = conflicting_pair()
    w, closure = linear_problem(a_f, a_r)
    opt = SIFT([(NAME, w)], lr=0.01, momentum=0.5, rank=K)
    for _ in range(2):
        opt.step(closure)
    state = opt.parts["sift"].state[w]
    assert torch.allclose(state["forget_momentum"], 1.5 * a_f) and torch.allclose(state["retain_momentum"], 1.5 * a_r)


@pytest.mark.parametrize("kind", ["tensor", "forget", "total", "retain"])
def test_sift_without_two_sides_never_takes_the_sift_branch(kind: str) -> None:
    a = torch.randn(ROWS, COLS, generator=gen(8))
    w = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=gen(9)))
    w0 = w.detach().clone()

    def closure() -> LossValue:
        value = (a * w).sum()
        return value if kind == "tensor" else Loss({kind: value})

    opt = SIFT([(NAME, w)], lr=0.1, threshold=1.0)  # threshold 1: any defined cosine would be a conflict
    loss = opt.step(closure)
    assert loss.dtype == torch.float32 and not loss.requires_grad and w.grad is None
    assert opt.last_sift == [] and opt.last_conflicts == {}
    assert torch.allclose(w.detach() - w0, -0.1 * math.sqrt(ROWS / COLS) * newton_schulz(a), atol=1e-5)
    assert len(opt.parts["sift"].state[w]) == 1  # the absent side never allocates a momentum


def two_batch_closure(model: torch.nn.Module) -> Callable[[], Loss]:
    forget, retain = batch(1), batch(2)
    return lambda: Loss({"forget": -model(**forget).loss, "retain": model(**retain).loss})


@pytest.mark.parametrize("name", ["muon", "sift"])
def test_lora_only_adapters_change(name: str) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = build_optimizer(name, model.named_parameters(), lr=0.01, adamw_lr=1e-3)
    closure = two_batch_closure(model)
    for _ in range(2):  # LoRA B starts at zero, so A only moves from the second step on
        assert torch.isfinite(opt.step(closure))
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    if name == "sift":
        assert isinstance(opt, SIFT) and set(opt.parts) == {"sift"}  # every LoRA matrix is selected
        assert set(opt.last_conflicts) <= {n for n in named if "lora_" in n} and opt.last_conflicts


def test_sift_on_a_full_model_selects_the_projections() -> None:
    model = tiny_llama()
    opt = build_optimizer("sift", model.named_parameters(), threshold=1.0)
    assert isinstance(opt, SIFT)
    assert set(opt.keys) == {n for n, _ in model.named_parameters() if n.endswith("_proj.weight")}
    opt.step(two_batch_closure(model))
    assert set(opt.last_sift) == set(opt.last_conflicts) == set(opt.keys)  # exercised the SVD branch


def test_bad_options_are_one_line_value_errors() -> None:
    w = torch.nn.Parameter(torch.zeros(ROWS, COLS))
    with pytest.raises(ValueError, match="unknown key\\(s\\) in optimizer 'sift': bogus "):
        build_optimizer("sift", [(NAME, w)], bogus=1)
    for name, options in [("sift", {"pattern": "("}), ("muon", {"exclude": "["}), ("sift", {"rank": 0}),
                          ("sift", {"threshold": 2.0}), ("muon", {"lr": -1.0})]:
        with pytest.raises(ValueError, match=f"optimizer '{name}'|optimizer\\.{next(iter(options))} must be") as err:
            build_optimizer(name, [(NAME, w)], **options)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="selects no trainable 2-D parameter"):
        build_optimizer("sift", [("model.embed_tokens.weight", w)])


@pytest.mark.parametrize("name", ["muon", "sift"])
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    model = tiny_llama()
    closure = two_batch_closure(model)
    opt = build_optimizer(name, model.named_parameters(), lr=0.01, adamw_lr=1e-3)
    for _ in range(2):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(closure)
    continued = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    resumed = build_optimizer(name, model.named_parameters(), lr=0.5, adamw_lr=0.5)  # restored below
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 0.01 and resumed.param_groups[-1]["lr"] == 1e-3
    resumed.step(closure)
    assert all(torch.equal(p, continued[n]) for n, p in model.named_parameters())


def test_large_matrices_use_a_seeded_sketch_exact_for_low_rank() -> None:
    u, v = orthonormal(300, K, 10), orthonormal(280, K, 11)
    a = u @ torch.diag(torch.tensor([5.0, 3.0, 2.0])) @ v.T
    rng_before = torch.get_rng_state()
    u_k, v_k = top_singular(a, K)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's random stream is not consumed
    assert torch.allclose(u_k @ u_k.T, u @ u.T, atol=1e-4) and torch.allclose(v_k @ v_k.T, v @ v.T, atol=1e-4)
    assert torch.equal(top_singular(a, K)[0], u_k)  # reproducible


@pytest.mark.parametrize(("name", "hidden", "selected"), [
    ("model.layers.0.self_attn.q_proj.weight", True, True),
    ("model.layers.0.mlp.down_proj.weight", True, True),
    ("base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight", True, True),
    ("model.layers.0.self_attn.qkv_proj.weight", True, True),
    ("transformer.h.0.attn.c_attn.weight", True, True),
    ("transformer.h.0.mlp.c_proj.weight", True, True),
    ("model.embed_tokens.weight", False, False),
    ("lm_head.weight", False, False),
    ("transformer.wte.weight", False, False),
    ("transformer.wpe.weight", False, False),
    ("output.weight", False, False),
    ("encoder.layer.0.attention.output.dense.weight", True, False),
])
def test_default_name_patterns(name: str, hidden: bool, selected: bool) -> None:
    w, other = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 4))
    muon = Muon([(name, w)])
    assert set(muon.parts) == ({"muon"} if hidden else {"adamw"})
    sift = SIFT([(name, w), ("layers.0.mlp.up_proj.weight", other)])
    assert (name in sift.keys) == selected

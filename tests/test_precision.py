"""Precision that learns: fp32 master weights under autocast, stochastically rounded bf16 updates, and the guard
that stops a run whose updates round away (bf16 runs on this CPU too, so all of it is checked here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_model
from unlearn.attacks.relearn import RelearnSettings, relearn
from unlearn.compute.models import load_model
from unlearn.compute.placement import Placement, autocast_forward, resolve
from unlearn.core.errors import UserError
from unlearn.optim.protocol import build_optimizer
from unlearn.optim.rounding import noise_generator, stochastic_round_
from unlearn.storage.metrics import Metric
from unlearn.tasks.data import Example, collate, encode
from unlearn.tasks.scoring import mean_token_nll, sequence_logprobs
from unlearn.tasks.task import RelearnPlan
from unlearn.training.loop import train
from unlearn.training.methods import LanguageModeling

CPU = torch.device("cpu")
FACTS = [Example(prompt=f"Q{i}: what is {i}?", target=f" It is {i * 7}.") for i in range(16)]


def placement(mode: str, gradients: bool = True) -> Placement:
    return Placement(CPU, torch.bfloat16, mode, gradients)


def tiny_in(mode: str, tokenizer, gradients: bool = True) -> torch.nn.Module:
    """The tiny model stored as ``mode`` stores weights, run as it runs them."""
    where = placement(mode, gradients)
    model = make_model(len(tokenizer)).to(where.weights)
    if where.autocast:
        autocast_forward(model, where)
    return model


def test_auto_is_master_for_gradient_grades_and_lean_for_zeroth_order() -> None:
    assert placement("auto").mode == "master" and placement("auto", gradients=False).mode == "lean"
    assert placement("auto").weights == torch.float32 and placement("auto", False).weights == torch.bfloat16
    assert Placement(CPU, torch.float32, "lean").mode == "fp32"  # nothing to round in fp32
    assert Placement(CPU, torch.float16, "auto", gradients=False).mode == "master"  # rounding is written for bf16
    with pytest.raises(UserError, match="needs --dtype bf16"):
        resolve("cpu", "fp16", "lean")
    with pytest.raises(UserError, match="unknown precision"):
        resolve("cpu", "bf16", "half")


def test_stochastic_rounding_is_exact_where_representable_and_unbiased_elsewhere() -> None:
    exact = torch.randn(1000).bfloat16()
    out = torch.empty_like(exact)
    stochastic_round_(out, exact.float(), noise_generator(CPU, 0, 0, 0))
    assert torch.equal(out, exact)
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 value (1 + 2^-7)...
    value[100_000:] = -value[100_000:]  # ...on both signs
    stochastic_round_(out := torch.empty_like(value, dtype=torch.bfloat16), value, noise_generator(CPU, 0, 0, 1))
    assert set(out[:100_000].float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    up = (out[:100_000].float() > 1).float().mean()
    assert abs(float(up) - 0.125) < 0.005  # (2^-10) / (2^-7) of the way: rounded up 1 time in 8
    assert float(out.float()[:100_000].mean()) == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert float(out.float()[100_000:].mean()) == pytest.approx(-(1.0 + 2**-10), abs=2e-5)


def _one_adamw_step(weights: torch.Tensor, grad: torch.Tensor, lean: bool) -> torch.Tensor:
    p = torch.nn.Parameter(weights.clone())
    opt = build_optimizer("adamw", [p], lr=1e-5, weight_decay=0.0)
    if lean:
        opt.round_updates(0)  # type: ignore[attr-defined]
    p.grad = grad.to(p.dtype)

    def closure() -> torch.Tensor:  # the gradient is already there: a loss whose gradient adds nothing
        return (p * 0).sum()

    opt.step(closure)
    return p.detach()


def test_an_lr_1e5_adamw_step_changes_bf16_weights_in_expectation_only_when_compensated() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(100_000, generator=gen) * 0.05).bfloat16()
    grad = torch.randn(100_000, generator=gen)
    intended = -1e-5 * torch.sign(grad)  # Adam's first step moves every weight by lr against its gradient's sign
    rounded = _one_adamw_step(weights, grad, lean=False)
    assert float((rounded == weights).float().mean()) > 0.9  # rounded to nearest: the step is lost almost everywhere
    lean = _one_adamw_step(weights, grad, lean=True)
    moved = (lean.float() - weights.float())
    assert float((lean != weights).float().mean()) > 0.02  # a few weights move by a whole bf16 step...
    # ...and on average by the intended amount: the mean of the moves along -sign(g) is lr, within its noise.
    along = moved * -torch.sign(grad)
    mean, error = float(along.mean()), float(along.std() / along.numel() ** 0.5)
    assert abs(mean - 1e-5) < 4 * error and error < 2e-6
    master = _one_adamw_step(weights.float(), grad, lean=False)  # fp32 master weights take it exactly
    assert torch.allclose(master - weights.float(), intended, rtol=1e-3, atol=1e-9)


def test_lean_keeps_adams_moments_moving_in_bf16() -> None:
    p = torch.nn.Parameter(torch.randn(4096).bfloat16() * 0.05)
    opt = build_optimizer("adamw", [p], lr=1e-5)
    opt.round_updates(3)  # type: ignore[attr-defined]
    for step in range(20):
        p.grad = torch.full_like(p, 1.0 + step)

        def closure() -> torch.Tensor:
            return (p * 0).sum()

        opt.step(closure)
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    # v = Σ 0.001·0.999^(19-k)·(1+k)²; rounded to nearest in bf16 it would stop near its first values.
    expected = sum(0.001 * 0.999 ** (19 - k) * (1 + k) ** 2 for k in range(20))
    assert float(state["exp_avg_sq"].float().mean()) == pytest.approx(expected, rel=0.01)


def _items(tokenizer) -> list:
    return [encode(tokenizer, ex) for ex in FACTS]


def _train(model, tokenizer, lr: float, steps: int = 10, rounded: bool = False, name: str = "adamw",
           **options) -> float:
    opt = build_optimizer(name, model.named_parameters(), lr=lr, **options)
    if rounded:
        opt.round_updates(0)  # type: ignore[attr-defined]
    return train(model, LanguageModeling(), opt, _items(tokenizer), None, pad_id=tokenizer.pad_token_id,
                 batch_size=8, max_steps=steps, seed=0, progress=False, rounded=rounded).final_loss


def test_the_guard_stops_a_pure_bf16_run_whose_updates_vanish(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"step 5: the last 5 updates left \d+% .*--precision master"):
        _train(tiny_in("pure", tokenizer), tokenizer, lr=1e-5)
    # The same run in fp32 master weights, and compensated in bf16, trains; the log records the share.
    _train(tiny_in("master", tokenizer), tokenizer, lr=1e-5)
    _train(tiny_in("lean", tokenizer), tokenizer, lr=1e-5, rounded=True)
    model = make_model(len(tokenizer))
    opt = build_optimizer("adamw", model.parameters(), lr=1e-5)
    log = tmp_path / "log.jsonl"
    train(model, LanguageModeling(), opt, _items(tokenizer), None, pad_id=tokenizer.pad_token_id, batch_size=8,
          max_steps=3, seed=0, progress=False, log_path=log)
    import json

    shares = [json.loads(line)["unchanged"] for line in log.read_text().splitlines()]
    assert shares and all(share < 0.01 for share in shares)  # fp32: every sampled weight moved


def test_master_and_lean_training_follow_fp32_and_pure_bf16_does_not(tokenizer) -> None:
    """Twenty AdamW steps at lr 1e-4: the loss after them in fp32, with fp32 master weights under bf16 autocast and
    with stochastically rounded bf16 weights agree; with bf16 weights rounded to nearest the run is stopped."""
    fp32 = _train(make_model(len(tokenizer)), tokenizer, lr=1e-4, steps=20)
    master = _train(tiny_in("master", tokenizer), tokenizer, lr=1e-4, steps=20)
    lean = _train(tiny_in("lean", tokenizer), tokenizer, lr=1e-4, steps=20, rounded=True)
    assert master == pytest.approx(fp32, abs=2e-3) and lean == pytest.approx(fp32, abs=5e-3)


@pytest.mark.parametrize("name", ["zo", "zo-adam"])
def test_zeroth_order_updates_to_bf16_weights_are_kept_in_expectation(tokenizer, name: str) -> None:
    """ZO-SGD (linear update) and ZO-Adam (buffers, per-chunk rule): with stochastic rounding the bf16 weights
    move by the fp32 update on average; rounded to nearest most of it is lost."""
    start = (torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 0.05).bfloat16()

    def moved(rounded: bool | None) -> torch.Tensor:
        p = torch.nn.Parameter(start.float().clone() if rounded is None else start.clone())
        opt = build_optimizer(name, [p], lr=1e-5, seed=0, exact_restore=True)
        if rounded:
            opt.round_updates(0)  # type: ignore[attr-defined]
        calls = []

        def closure() -> torch.Tensor:
            # L+ − L− = 2μ whatever the weights' precision: the same coefficient (1) in every mode, so the modes
            # differ only in how the update -lr·z is stored (a few 1e-5, far below a bf16 step of these weights).
            calls.append(1)
            return torch.tensor(1e-3 if len(calls) % 2 else -1e-3)

        opt.step(closure)
        return p.detach().float() - start.float()

    exact = moved(None)
    assert float((moved(False) == 0).float().mean()) > 0.5  # rounded to nearest: most of it lost
    lean = moved(True)
    assert float((lean * exact).sum() / (exact * exact).sum()) == pytest.approx(1.0, abs=0.05)
    assert float((lean - exact).mean()) == pytest.approx(0.0, abs=float(exact.abs().mean()) * 0.05)


def test_master_weights_stay_fp32_and_compute_runs_in_bf16(tiny_model_dir: Path, tokenizer) -> None:
    loaded = load_model(str(tiny_model_dir), placement=placement("master"))
    model = loaded.model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen: list[torch.dtype] = []
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    batch = collate(_items(tokenizer)[:2], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits
    sequence_logprobs(model, batch)  # the scorers call the decoder and the head directly
    handle.remove()
    assert seen == [torch.bfloat16, torch.bfloat16] and logits.dtype == torch.float32
    lean = load_model(str(tiny_model_dir), placement=placement("lean"))
    assert all(p.dtype == torch.bfloat16 for p in lean.model.parameters())


def _relearn_plan(tokenizer) -> RelearnPlan:
    metric = Metric("forget_nll", "forget NLL", better="lower", role="forget")

    def probe(model, tok, settings) -> dict[str, float]:
        with torch.no_grad():
            batch = collate(_items(tok)[8:], tok.pad_token_id)
            return {"forget_nll": float(mean_token_nll(model, batch))}

    return RelearnPlan(train=FACTS, probe=probe, probe_metrics=(metric,), measured_on="the same facts")


def test_a_bf16_relearning_attack_recovers_what_the_fp32_one_does(tokenizer) -> None:
    """The attack that must never report "nothing came back" because its updates rounded away."""
    settings = RelearnSettings(steps=15, lr=2e-5, batch_size=8, checkpoints=[0, 15], seed=0)  # the attack's lr

    def attack(model, where: Placement) -> float:
        _, curve, _ = relearn(model, tokenizer, _relearn_plan(tokenizer), settings, None, progress=False,
                              placement=where)
        return curve[0]["forget_nll"] - curve[-1]["forget_nll"]  # how far the NLL came down

    fp32 = attack(make_model(len(tokenizer)), Placement(CPU, torch.float32))
    assert fp32 > 0.02
    assert attack(tiny_in("master", tokenizer), placement("master")) == pytest.approx(fp32, rel=0.02)
    assert attack(tiny_in("lean", tokenizer), placement("lean")) == pytest.approx(fp32, rel=0.05)
    with pytest.raises(UserError, match="round away"):
        attack(tiny_in("pure", tokenizer), placement("pure"))


def test_zeroth_order_probes_on_bf16_weights_drift_within_a_bound() -> None:
    """Lean ZO probes in place, rounded to nearest: θ → fl(θ + d) → fl(· − 2d), then the undo folded into the
    stochastically rounded update. Restoring is not exact (fl is not injective), so the drift is bounded instead:
    at lr 0 no weight moves by more than two bf16 steps of |θ| + |d| per step, and the drift has no direction."""
    gen = torch.Generator().manual_seed(2)
    start = (torch.randn(100_000, generator=gen) * 0.05).bfloat16()
    p = torch.nn.Parameter(start.clone())
    opt = build_optimizer("zo", [p], lr=0.0, seed=0)
    opt.round_updates(0)  # type: ignore[attr-defined]
    weights = torch.randn(100_000, generator=gen)
    before = p.detach().float().clone()
    opt.step(lambda: (p.float() * weights).sum())
    after = p.detach().float()
    step = torch.finfo(torch.bfloat16).eps * (before.abs() + 2e-3 * 5)  # one bf16 step of |θ| + a 5σ |d|
    assert bool(((after - before).abs() <= 2 * step).all())
    moved = after != before
    assert 0.0 < float(moved.float().mean()) < 0.5
    drift = (after - before)[moved] / step[moved]
    assert abs(float(drift.mean())) < 4 * float(drift.std()) / drift.numel() ** 0.5


def test_data_order_and_relearning_split_do_not_depend_on_torch_streams_or_device() -> None:
    """The data order and the relearning split come from Python's own seeded generator (integer arithmetic, the
    same on every machine), never from torch's CPU or CUDA generators: a CPU and a GPU run of one seed train on the
    same rows. Pinned values catch a change to a device-dependent stream."""
    from unlearn.tasks.data import epoch_order
    from unlearn.tasks.task import split_items

    torch.manual_seed(123)  # torch's global streams are irrelevant to both
    assert epoch_order(10, seed=0, epoch=0) == [7, 8, 1, 5, 3, 4, 2, 0, 9, 6]
    assert split_items(10, None, seed=0)[0] == [0, 2, 4, 6, 9]
    torch.manual_seed(321)
    assert epoch_order(10, seed=0, epoch=0) == [7, 8, 1, 5, 3, 4, 2, 0, 9, 6]


def test_lean_rounding_noise_resumes_from_the_optimizer_state() -> None:
    """A lean run resumed from a checkpoint (weights and optimizer state) takes the same steps as one never
    interrupted: the rounding noise is seeded by the step count the optimizer's state_dict carries."""
    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        p = torch.nn.Parameter((torch.randn(2048, generator=torch.Generator().manual_seed(5)) * 0.05).bfloat16())
        opt = build_optimizer("adamw", [p], lr=1e-5)
        opt.round_updates(0)  # type: ignore[attr-defined]
        return p, opt

    def step(p: torch.nn.Parameter, opt: torch.optim.Optimizer, k: int) -> None:
        p.grad = torch.full_like(p, float(k % 3) - 1.0)
        opt.step(lambda: (p * 0).sum())

    p, opt = fresh()
    for k in range(4):
        step(p, opt, k)
    q, other = fresh()
    for k in range(2):
        step(q, other, k)
    saved_weights, saved_state = q.detach().clone(), other.state_dict()
    q, other = fresh()
    q.data.copy_(saved_weights)
    other.load_state_dict(saved_state)
    for k in range(2, 4):
        step(q, other, k)
    assert torch.equal(p.detach(), q.detach())


def test_a_lora_update_merged_into_bf16_weights_is_kept_in_expectation(tokenizer) -> None:
    """Under `lean` the base stays bf16: merging an adapter's small update rounded to nearest would lose it."""
    from unlearn.training.adapters import add_lora, merge_lora

    def merged(seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        model = make_model(len(tokenizer)).bfloat16()
        before = model.model.layers[0].mlp.down_proj.weight.detach().float().clone()
        model = add_lora(model, 2)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(1e-4)  # an update of about 1e-4·Σ A: far below a bf16 step of most weights
        delta = model.base_model.model.model.layers[0].mlp.down_proj.get_delta_weight("default").detach().float()
        after = merge_lora(model, seed).model.layers[0].mlp.down_proj.weight
        assert after.dtype == torch.bfloat16
        return after.detach().float() - before, delta

    nearest, delta = merged(None)
    rounded, _ = merged(0)
    assert float((nearest * delta).sum() / (delta * delta).sum()) < 0.6  # mostly lost
    assert float((rounded * delta).sum() / (delta * delta).sum()) == pytest.approx(1.0, abs=0.1)


def _zo_steps(model: torch.nn.Module, tokenizer, steps: int, lr: float, transient: bool, rounded: bool,
              exact_restore: bool = False) -> None:
    opt = build_optimizer("zo", model.named_parameters(), lr=lr, seed=0, exact_restore=exact_restore)
    if rounded:
        opt.round_updates(0)  # type: ignore[attr-defined]
    if transient:
        opt.probe_without_writing(model)  # type: ignore[attr-defined]
    batch = collate(_items(tokenizer)[:8], tokenizer.pad_token_id)
    for _ in range(steps):
        opt.step(lambda: mean_token_nll(model, batch))


def test_transient_probes_restore_bf16_weights_exactly(tokenizer) -> None:
    """Probed in place and rounded to nearest, bf16 weights drift at lr 0 (`unlearn.perf.zo_drift` measures it on
    the real model); probed on transient copies, they are exactly what they were."""
    start = make_model(len(tokenizer)).bfloat16().state_dict()
    in_place = make_model(len(tokenizer)).bfloat16()
    _zo_steps(in_place, tokenizer, steps=3, lr=0.0, transient=False, rounded=True)
    assert any(not torch.equal(v, start[k]) for k, v in in_place.state_dict().items())
    transient = make_model(len(tokenizer)).bfloat16()
    _zo_steps(transient, tokenizer, steps=3, lr=0.0, transient=True, rounded=True)
    assert all(torch.equal(v, start[k]) for k, v in transient.state_dict().items())


def test_transient_probes_take_the_steps_of_exact_in_place_probes_in_fp32(tokenizer) -> None:
    """The same θ ± d reaches the forward either way (computed in fp32 from the same θ), so in fp32 the two take the
    same steps bit for bit; with lr > 0 the weights do move."""
    a, b = make_model(len(tokenizer)), make_model(len(tokenizer))
    _zo_steps(a, tokenizer, steps=3, lr=1e-3, transient=False, rounded=False, exact_restore=True)
    _zo_steps(b, tokenizer, steps=3, lr=1e-3, transient=True, rounded=False)
    start = make_model(len(tokenizer)).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in b.state_dict().items())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_quantized_bf16_run_is_measured_in_bf16_compute(tiny_model_dir: Path, tokenizer) -> None:
    """The quantization attack on a bf16 run runs the quantized model in bf16 compute, as the run was measured:
    otherwise the recovery ratio would mix the rounding of the weights with a change of compute precision."""
    from unlearn.attacks.quantize import QuantSpec, load_quantized

    seen: list[torch.dtype] = []
    for compute in (torch.float32, torch.bfloat16):
        model = load_quantized(tiny_model_dir, QuantSpec("rtn", 4), compute=compute)
        handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        model(input_ids=collate(_items(tokenizer)[:1], tokenizer.pad_token_id)["input_ids"])
        handle.remove()
    assert seen == [torch.float32, torch.bfloat16]


def test_a_forward_that_raises_midway_leaves_no_transient_probe_in_the_weights(tokenizer) -> None:
    model = make_model(len(tokenizer)).bfloat16()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer("zo", model.named_parameters(), lr=0.0, seed=0)
    opt.round_updates(0)  # type: ignore[attr-defined]
    opt.probe_without_writing(model)  # type: ignore[attr-defined]
    batch = collate(_items(tokenizer)[:2], tokenizer.pad_token_id)

    def fails_inside() -> torch.Tensor:
        def stop(*_: object) -> None:
            raise KeyboardInterrupt

        # After the probe's own pre-hook has swapped this module's weight, before its after-hook can put it back.
        handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(stop)
        try:
            return mean_token_nll(model, batch)
        finally:
            handle.remove()

    with pytest.raises(KeyboardInterrupt):
        opt.step(fails_inside)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_lean_steps_do_not_depend_on_how_parameters_are_batched(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """LeanStep widens as many parameters at once as fit its budget; one at a time gives the same weights."""
    from unlearn.optim import rounding

    def trained(budget: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(rounding, "BATCH_BYTES", budget)
        model = tiny_in("lean", tokenizer)
        _train(model, tokenizer, lr=1e-4, steps=3, rounded=True)
        return model.state_dict()

    one, all_at_once = trained(1), trained(1 << 30)
    assert all(torch.equal(v, all_at_once[k]) for k, v in one.items())


def test_zeroth_order_probes_below_the_weights_precision_stop_the_run() -> None:
    """μ = 1e-3 on bf16 weights near 1 (the norms; a bf16 step there is 0.0078): almost every probe rounds back
    to the weight, so the estimate is made of the few that do not. Such a member is refused at its first step; the
    same probes on fp32 weights go on."""
    target = torch.randn(64, generator=torch.Generator().manual_seed(0))

    def run(dtype: torch.dtype) -> None:
        p = torch.nn.Parameter(torch.ones(64, dtype=dtype))
        opt = build_optimizer("zo", [p], lr=1e-3, seed=0)
        opt.round_updates(0)  # type: ignore[attr-defined]
        for _ in range(6):
            opt.step(lambda: ((p.float() - target) ** 2).sum())

    run(torch.float32)
    with pytest.raises(UserError, match=r"a probe of mu 0.001 moves only 0% of the probed weights.*--precision master"):
        run(torch.bfloat16)


def test_zeroth_order_steps_whose_probes_all_see_one_loss_stop_the_run() -> None:
    p = torch.nn.Parameter(torch.zeros(8))
    opt = build_optimizer("zo", [p], lr=1e-3, seed=0)
    with pytest.raises(UserError, match="the last 5 zeroth-order steps found no loss difference"):
        for _ in range(5):
            opt.step(lambda: (p * 0).sum() + 1.0)  # a loss that does not depend on the probed weights

"""The zeroth-order stabilizers (clip, normalize, warm-up/schedule, rollback, include) and rank-based ZO."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.optim.protocol import OPTIMIZERS, build_optimizer, check_options
from unlearn.optim.zo import ZerothOrderBase, centered_ranks
from unlearn.optim.zo_stable import Stabilizers

DIM = 64


def spiky(theta: torch.Tensor, scale: float = 1e9):
    """A loss whose two probes differ enormously: the unclipped coefficient is ~scale."""
    direction = torch.linspace(-1.0, 1.0, theta.numel())
    return lambda: scale * (theta * direction).sum() + theta.square().sum()


def moved(name: str, scale: float = 1e9, **options) -> float:
    """‖Δθ‖ after one step on the spiky loss."""
    theta = torch.nn.Parameter(torch.zeros(DIM))
    opt = build_optimizer(name, [theta], direction="rademacher", **options)
    opt.step(spiky(theta, scale))
    return float(theta.detach().norm())


@pytest.mark.parametrize("clip", [0.5, 2.0])
def test_clip_bounds_the_update_whatever_the_loss_difference(clip: float) -> None:
    """Rademacher z has ‖z‖ = √d exactly, so one clipped step moves θ by at most lr·clip·√d."""
    lr = 1e-3
    assert moved("zo", lr=lr, clip=clip) <= lr * clip * math.sqrt(DIM) * (1 + 1e-6)
    assert moved("zo", lr=lr) > 1e3 * lr * clip * math.sqrt(DIM)  # the same probe, unclipped, is huge


def test_normalize_makes_the_step_size_independent_of_the_loss_scale() -> None:
    lr = 1e-3
    small, large = moved("zo", scale=1.0, lr=lr, normalize=True), moved("zo", scale=1e9, lr=lr, normalize=True)
    assert small == pytest.approx(large) and small == pytest.approx(lr * math.sqrt(DIM))  # first step: |c/rms| = 1
    assert moved("zo", scale=1.0, lr=lr) != pytest.approx(moved("zo", scale=1e9, lr=lr))


def test_rank_zo_is_bounded_and_sees_only_the_order_of_the_losses() -> None:
    lr = 1e-3
    assert moved("zo-rank", lr=lr, q=1) <= lr * math.sqrt(DIM) * (1 + 1e-6)
    steps = []
    for transform in (lambda v: v, lambda v: 1e6 * v + 3.0, torch.exp):  # increasing maps of the loss
        theta = torch.nn.Parameter(torch.zeros(DIM))
        opt = build_optimizer("zo-rank", [theta], lr=lr, q=4, seed=3)
        base = spiky(theta, scale=1.0)
        opt.step(lambda base=base, transform=transform: transform(base()))
        steps.append(theta.detach().clone())
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2])


def test_centered_ranks() -> None:
    assert centered_ranks([3.0, 1.0, 2.0]) == [0.5, -0.5, 0.0]
    assert centered_ranks([1.0, 1.0, 5.0, 0.0]) == pytest.approx([0.0, 0.0, 0.5, -0.5])  # ties share
    assert centered_ranks([2.0]) == [0.0]


@pytest.mark.parametrize("name", ["zo", "zo-adam", "fzoo", "zo-rank", "hizoo"])
def test_rollback_restores_weights_and_buffers_bit_exactly(name: str) -> None:
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(DIM))
    opt = build_optimizer(name, [theta], lr=10.0, rollback=0.0)  # lr so large every step makes things worse
    f = lambda: theta.square().sum()  # noqa: E731
    opt.step(f)  # a first step (rolled back or not) creates the member's buffers
    before = theta.detach().clone()
    state = {k: v.clone() for k, v in opt.state[theta].items()}
    opt.step(f)
    assert opt.diagnostics()["rolled_back"] == 1.0
    assert torch.equal(theta.detach(), before)
    assert set(opt.state[theta]) == set(state) and all(torch.equal(opt.state[theta][k], v) for k, v in state.items())
    assert opt.diagnostics()["forwards"] == opt.forwards_per_step + 1  # the check costs one forward


def test_rollback_keeps_a_step_that_does_not_jump() -> None:
    theta = torch.nn.Parameter(torch.ones(DIM))
    opt = build_optimizer("zo-rank", [theta], lr=1e-3, q=4, rollback=0.0)
    losses = []
    for _ in range(20):
        opt.step(lambda: theta.square().sum())
        losses.append(float(theta.detach().square().sum()))
    assert losses[-1] < DIM  # it went down; kept steps are never worse than where they started
    assert all(b <= a for a, b in zip([float(DIM), *losses], losses, strict=False))


def test_rollback_on_the_retain_part_catches_what_the_total_lets_through() -> None:
    """A step can lower the total (forgetting) while it raises the retain term: watched on retain, it is undone."""
    from unlearn.optim.loss import Loss

    v = torch.ones(DIM) / DIM**0.5

    def run(on: str) -> float:
        theta = torch.nn.Parameter(torch.zeros(DIM))
        opt = build_optimizer("zo-rank", [theta], lr=0.1, q=1, seed=1, rollback=0.0, rollback_on=on)
        opt.step(lambda: Loss({"forget": -10.0 * (v @ theta), "retain": (v @ theta).square()}))
        return opt.diagnostics()["rolled_back"]

    assert run("total") == 0.0 and run("retain") == 1.0
    theta = torch.nn.Parameter(torch.zeros(DIM))
    with pytest.raises(ValueError, match="no such part"):
        build_optimizer("zo", [theta], rollback=0.0, rollback_on="retain").step(lambda: theta.sum())


def test_rollback_on_a_list_watches_the_first_part_the_loss_has() -> None:
    """[retain, total]: the retain part where the method has one, else the total (GradAscent has none)."""
    from unlearn.optim.loss import Loss

    v = torch.ones(DIM) / DIM**0.5

    def rolled_back(loss) -> float:
        theta = torch.nn.Parameter(torch.zeros(DIM))
        opt = build_optimizer("zo-rank", [theta], lr=0.1, q=1, seed=1, rollback=0.0, rollback_on=["retain", "total"])
        opt.step(lambda: loss(theta))
        return opt.diagnostics()["rolled_back"]

    assert rolled_back(lambda t: Loss({"forget": -10.0 * (v @ t), "retain": (v @ t).square()})) == 1.0
    assert rolled_back(lambda t: Loss({"forget": -10.0 * (v @ t)})) == 0.0  # falls back to the total
    assert rolled_back(lambda t: Loss({"forget": -(v @ t) + 1e3 * (t @ t)})) == 1.0  # and rolls back on it
    with pytest.raises(ValueError, match="must not be an empty list"):
        build_optimizer("zo", [torch.nn.Parameter(torch.zeros(2))], rollback_on=[])


def test_include_probes_and_updates_only_matching_parameters() -> None:
    torch.manual_seed(0)
    kept, trained = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    frozen = kept.detach().clone()
    opt = build_optimizer("zo", [("layers.0.mlp.down_proj.weight", trained), ("layers.0.norm.weight", kept)],
                          lr=0.1, include=r"down_proj")
    start = trained.detach().clone()
    for _ in range(3):
        opt.step(lambda: (trained.square().sum() + kept.square().sum()))
    assert torch.equal(kept.detach(), frozen) and not torch.equal(trained.detach(), start)
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        build_optimizer("zo", [("layers.0.norm.weight", kept)], include="lora_")
    with pytest.raises(ValueError, match="named parameters"):
        build_optimizer("zo", [kept], include="norm")


def test_include_list_uses_the_first_pattern_that_selects_something() -> None:
    """The hybrid default names the norms first: with LoRA only adapters train, and the next pattern applies."""
    lora, norm = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    full = build_optimizer("zo", [("layers.0.mlp.lora_A.weight", lora), ("layers.0.input_layernorm.weight", norm)],
                           include=["norm", "lora_"])
    adapters = build_optimizer("zo", [("layers.0.mlp.lora_A.weight", lora)], include=["norm", "lora_"])
    assert [p is norm for p in full.params] == [True] and [p is lora for p in adapters.params] == [True]
    with pytest.raises(ValueError, match=r"include \['norm', 'x'\] selects no trainable parameter"):
        build_optimizer("zo", [("layers.0.mlp.lora_A.weight", lora)], include=["norm", "x"])
    with pytest.raises(ValueError, match="not a valid regular expression"):  # a fallback is checked before it is needed
        build_optimizer("zo", [("layers.0.mlp.lora_A.weight", lora)], include=["lora_", "("])


def test_warmup_and_schedules() -> None:
    warm = Stabilizers(warmup=4)
    assert [warm.lr_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = Stabilizers(warmup=2, schedule="cosine", total_steps=12)
    assert cosine.lr_factor(0) == 0.5 and cosine.lr_factor(2) == 1.0 and cosine.lr_factor(12) == pytest.approx(0.0)
    assert Stabilizers(schedule="linear", total_steps=10).lr_factor(5) == pytest.approx(0.5)
    theta = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer("zo", [theta], lr=1e-2, warmup=2)
    opt.step(lambda: theta.sum())
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # what log.jsonl records is the rate used


def test_every_member_takes_the_stabilizers_and_checks_them() -> None:
    for name, cls in OPTIMIZERS.items():
        if issubclass(cls, ZerothOrderBase):
            check_options(name, {"clip": 1.0, "normalize": True, "warmup": 3, "rollback": 0.5, "include": "x"})
    with pytest.raises(ValueError, match="optimizer.clip must be"):
        check_options("zo", {"clip": -1.0})
    with pytest.raises(ValueError, match="unknown key\\(s\\) in optimizer 'zo': clipp "):
        check_options("zo", {"clipp": 1.0})
    with pytest.raises(ValueError, match="needs total_steps"):
        build_optimizer("zo", [torch.nn.Parameter(torch.ones(2))], schedule="cosine")


def test_hybrid_zo_rate_follows_the_first_order_rate_and_its_schedule_spans_the_zo_steps() -> None:
    theta = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer("hybrid", [theta], fo={"name": "adamw", "lr": 2e-5},
                          zo={"name": "zo", "schedule": "cosine"}, block=3, ratio=1.0, total_steps=10, zo_lr_ratio=0.5)
    assert opt.zo.param_groups[0]["initial_lr"] == pytest.approx(1e-5)
    # laid out from the end: F Z Z Z F F F Z Z Z
    assert opt.zo.stable.total_steps == sum(opt.current_grade(i) == "zeroth-order" for i in range(10)) == 6


def test_a_hybrid_run_logs_fixed_row_probes_at_its_block_boundaries(tmp_path, tiny_model_dir) -> None:
    import json

    from tests.conftest import TINY_BENCH, cli

    result = cli("run", "--method", "npo", "--optimizer", "hybrid", "--model", str(tiny_model_dir), "--steps", "6",
                 "--batch-size", "2", "--set", "optimizer.block=2", "--set", "optimizer.zo.rollback=0.0",
                 "--set", "optimizer.zo.rollback_on=retain", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "runs" / "npo-hybrid" / "log.jsonl").read_text().splitlines()]
    assert [r["grade"] for r in log] == ["zeroth-order"] * 2 + ["first-order"] * 2 + ["zeroth-order"] * 2
    assert [r["step"] for r in log if "probe" in r] == [1, 3, 5] and "probe_end" in log[-1]
    probes = [r["probe"] for r in log if "probe" in r] + [log[-1]["probe_end"]]
    assert all(set(p) == {"forget", "retain", "total"} for p in probes)
    assert probes[1] != probes[2]  # the first-order block between them moved the model
    zo_steps = [r for r in log if r["grade"] == "zeroth-order"]
    assert all(r["optimizer"]["forwards"] == 3 and r["forwards"] == 3 for r in zo_steps)  # 2 probes + the check

"""The robust and comparison baselines (SAM-NPO, RS-NPO, KL-retain, IdkDPO, task vector) against hand computations
on a tiny model: each one's loss is rebuilt from full-logit forwards of explicitly edited model copies."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FORGET, RETAIN, TINY_BENCH, assert_user_error, cli
from unlearn.core.errors import UserError
from unlearn.recipes.pipeline import check_run_config
from unlearn.tasks.data import collate, encode, variant
from unlearn.training.config import load_run_config
from unlearn.training.methods import NPO, RSNPO, SAMNPO, IdkDPO, KLRetain, TaskVector, build_method, shifted_weights
from unlearn.training.methods.preference import IDK_ANSWERS


def token_logprobs(model, batch) -> list[torch.Tensor]:
    """Per row, the target tokens' log-probs from a plain full-logits forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    return [logp[r, labels[r] != -100].gather(-1, labels[r, labels[r] != -100].unsqueeze(-1)).squeeze(-1)
            for r in range(labels.shape[0])]


def npo_forget_by_hand(model, batch, ref: torch.Tensor, beta: float) -> torch.Tensor:
    logp = torch.stack([row.sum() for row in token_logprobs(model, batch)])
    return (-(2.0 / beta) * torch.log(torch.sigmoid(-beta * (logp - ref)))).mean()


def prepared(method, model, tok):
    forget = method.encode_forget(tok, FORGET, 256)
    retain = [encode(tok, e) for e in RETAIN]
    method.prepare(model, forget, retain, tok.pad_token_id, batch_size=2)
    return collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)


def moved_copy(model, shifts: dict[str, torch.Tensor]):
    """A deep copy of `model` whose named parameters are moved by `shifts` in place (the plain way to shift)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in shifts:
                p.add_(shifts[name])
    return other


@torch.no_grad()  # values only: no graph
def test_shifted_weights_shift_tied_weights_once_and_restore_everything(tiny):
    model, tok = tiny
    batch = collate([encode(tok, e) for e in FORGET], tok.pad_token_id)
    order = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one parameter, two modules
    gen = torch.Generator().manual_seed(0)
    by_name = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    with shifted_weights(model, {id(params[n]): d for n, d in by_name.items()}):
        inside = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    expected = moved_copy(model, by_name)(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.allclose(inside, expected, atol=1e-5)
    assert [n for n, _ in model.named_parameters()] == order  # back in place, in order
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sam_npo_takes_the_forget_loss_at_the_ascent_point(tiny):
    model, tok = tiny
    method = SAMNPO(rho=0.05, gamma=1.0, alpha=2.0)
    forget, retain = prepared(method, model, tok)
    # By hand: g = grad of NPO's forget loss, delta = rho * g / ||g||, the forget loss of a copy moved by delta.
    loss = npo_forget_by_hand(model, forget, forget["ref_logp"], beta=0.1)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    delta = {n: 0.05 * g / norm for n, g in zip(names, grads, strict=True)}
    moved = moved_copy(model, delta)
    expected = npo_forget_by_hand(moved, forget, forget["ref_logp"], beta=0.1)
    assert float(expected.detach()) != pytest.approx(float(loss.detach()), abs=1e-4)  # the shift matters on this case

    parts = method(model, forget, retain).parts
    assert float(parts["forget"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # Its gradient is the forget gradient at the shifted point (delta held fixed), flowing to the unshifted weights.
    got = torch.autograd.grad(parts["forget"], [p for _, p in model.named_parameters()])
    want = torch.autograd.grad(expected, [p for _, p in moved.named_parameters()])
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
    # The retain term is NPO's, at the unshifted weights; the model is left unchanged.
    npo_retain = NPO(alpha=2.0)(model, forget, retain).parts["retain"]
    assert float(parts["retain"].detach()) == pytest.approx(float(npo_retain.detach()))


@torch.no_grad()  # values only: no graph
def test_sam_npo_with_rho_zero_is_npo(tiny):
    model, tok = tiny
    sam, npo = SAMNPO(rho=0.0), NPO()
    forget, retain = prepared(sam, model, tok)
    assert float(sam(model, forget, retain).total) == pytest.approx(float(npo(model, forget, retain).total), rel=1e-6)


@torch.no_grad()  # values only: no graph
def test_rs_npo_averages_the_forget_loss_over_its_seeded_noise(tiny):
    model, tok = tiny
    method = RSNPO(sigma=0.02, samples=3, seed=7)
    forget, retain = prepared(method, model, tok)
    method.begin_step(4)
    value = float(method(model, forget, retain).parts["forget"])
    names = {id(p): n for n, p in model.named_parameters()}
    by_hand = []
    for k in range(3):
        noise = method.noise(model, k)
        flat = torch.cat([d.flatten() for d in noise.values()])
        assert float(flat.std()) == pytest.approx(0.02, rel=0.05)  # N(0, sigma^2) entries
        by_hand.append(float(npo_forget_by_hand(moved_copy(model, {names[i]: d for i, d in noise.items()}),
                                                forget, forget["ref_logp"], beta=0.1)))
    assert value == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    assert len(set(by_hand)) == 3  # three different draws
    assert float(method(model, forget, retain).parts["forget"]) == value  # the same step draws the same noise
    method.begin_step(5)
    assert float(method(model, forget, retain).parts["forget"]) != value  # the next step draws new noise
    assert float(RSNPO(sigma=0.0)(model, forget, retain).parts["forget"]) == pytest.approx(
        float(npo_forget_by_hand(model, forget, forget["ref_logp"], beta=0.1)), rel=1e-6)


@torch.no_grad()  # values only: no graph
def test_kl_retain_is_the_kl_from_the_starting_model_on_retain_targets(tiny):
    model, tok = tiny
    method = KLRetain(gamma=1.0, alpha=0.5)
    forget, retain = prepared(method, model, tok)
    assert float(method(model, forget, retain).parts["retain"]) == pytest.approx(0.0, abs=1e-6)  # still the start
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    # By hand: full logits of both models, KL(p_ref || p) summed over the vocabulary at each target position.
    labels = retain["labels"][:, 1:]
    mask = labels != -100
    inputs = {k: retain[k] for k in ("input_ids", "attention_mask")}
    log_p = torch.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)[mask]
    log_ref = torch.log_softmax(method.reference(**inputs).logits[:, :-1].float(), dim=-1)[mask]
    kl = (log_ref.exp() * (log_ref - log_p)).sum(-1).mean()
    parts = method(model, forget, retain).parts
    assert float(kl) > 1e-4
    assert float(parts["retain"]) == pytest.approx(0.5 * float(kl), rel=1e-5)
    nll = -torch.cat(token_logprobs(model, forget)).mean()
    assert float(parts["forget"]) == pytest.approx(-float(nll), rel=1e-5)
    assert not any(p.requires_grad for p in method.reference.parameters())


@torch.no_grad()  # values only: no graph
def test_idkdpo_margin_against_a_hand_computation(tiny):
    model, tok = tiny
    method = IdkDPO(beta=0.1, gamma=1.0, alpha=1.0, seed=3)
    items = method.encode_forget(tok, FORGET, 256)
    for item, example in zip(items, FORGET, strict=True):
        refusal = item.variants["idk"]
        assert tok.decode(refusal.input_ids[:refusal.n_prompt]) == example.prompt  # the same question
        assert tok.decode(refusal.input_ids[refusal.n_prompt:-1]) in IDK_ANSWERS
    assert [i.variants["idk"].input_ids for i in method.encode_forget(tok, FORGET, 256)] == \
        [i.variants["idk"].input_ids for i in items]  # drawn with the seed
    forget, retain = prepared(method, model, tok)
    # At the start the policy is its own reference: margin 0, loss (2/beta) log 2.
    assert float(method(model, forget, retain).parts["forget"]) == pytest.approx(20 * math.log(2), rel=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    win = torch.stack([r.sum() for r in token_logprobs(model, variant(forget, "idk"))])
    lose = torch.stack([r.sum() for r in token_logprobs(model, forget)])
    margin = (win - forget["ref_logp_idk"]) - (lose - forget["ref_logp"])
    assert float(margin.abs().min()) > 1e-3
    expected = (-(2 / 0.1) * F.logsigmoid(0.1 * margin)).mean()
    assert float(method(model, forget, retain).parts["forget"]) == pytest.approx(float(expected), rel=1e-5)


@torch.no_grad()  # values only: no graph
def test_task_vector_negates_what_fine_tuning_moved(tiny):
    model, tok = tiny
    method = TaskVector(alpha=0.5)
    prepared(method, model, tok)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = {n: 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
             for i, (n, p) in enumerate(model.named_parameters())}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(moved[n])  # what fine-tuning did
    method.finish(model)
    for n, p in model.named_parameters():
        assert torch.allclose(p, start[n] - 0.5 * moved[n], atol=1e-6), n
    forget, retain = collate(method.encode_forget(tok, FORGET, 256), tok.pad_token_id), None
    assert float(method(model, forget, retain).parts["forget"]) == pytest.approx(
        float(-torch.cat(token_logprobs(model, forget)).mean()), rel=1e-5)  # training descends the forget NLL


@pytest.mark.parametrize(("method", "optimizer", "extra", "message"), [
    ("sam-npo", "zo", [], "optimizer 'zo' computes no gradients"),
    ("sam-npo", "adamw", ["train.gradient_checkpointing=true"], "leave train.gradient_checkpointing off"),
    ("rs-npo", "adamw", ["train.gradient_checkpointing=true"], "leave train.gradient_checkpointing off"),
    ("task-vector", "adamw", ["train.stop_at=forget/mcq_acc <= 0.3", "train.eval_every=5"],
     "train.stop_at cannot be used"),
])
def test_refused_pairings_are_one_line(method, optimizer, extra, message):
    with pytest.raises(UserError, match=message):
        check_run_config(load_run_config(method, optimizer, overrides=extra))


def test_rs_npo_runs_with_zeroth_order():
    check_run_config(load_run_config("rs-npo", "zo"))  # a smoothed loss is still a loss to evaluate


@pytest.mark.parametrize("name", ["sam-npo", "idkdpo", "task-vector"])
def test_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, name):
    result = cli("run", "--method", name, "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "2",
                 "--batch-size", "2", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / f"{name}-adamw"
    assert (run / "model").is_dir() and f"| {name}-adamw |" in result.stdout
    # SAM's loss passes over the forget batch twice (the gradient at theta, then the loss at the ascent point):
    # counted as two forwards, so its cost is not shown as NPO's.
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["forwards"] for r in log] == [2 if name == "sam-npo" else 1] * 2
    assert json.loads((run / "metrics.json").read_text())["train"]["forward_passes"] == sum(r["forwards"] for r in log)


def test_rs_npo_counts_one_forward_per_draw(tmp_path, tiny_model_dir):
    result = cli("run", "--method", "rs-npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "1",
                 "--batch-size", "2", "--set", "method.samples=2", "-q", *TINY_BENCH, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (tmp_path / "runs/rs-npo-adamw/log.jsonl").read_text().splitlines()]
    assert [r["forwards"] for r in log] == [2]


def test_sam_npo_with_zeroth_order_is_refused_from_the_command_line(tmp_path, tiny_model_dir):
    result = cli("run", "--method", "sam-npo", "--optimizer", "zo", "--model", str(tiny_model_dir), "-q",
                 *TINY_BENCH, cwd=tmp_path)
    assert_user_error(result, "computes no gradients", tmp_path)


def test_every_new_method_builds_with_its_declared_defaults():
    for name in ("sam-npo", "rs-npo", "kl-retain", "idkdpo", "task-vector"):
        method = build_method(name)
        assert method.settings == type(method).Settings()

"""Each method against a value computed independently (full logits, explicit formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FORGET, RETAIN
from unlearn.tasks.data import Encoded, collate, encode, endless_rows, rows_used
from unlearn.tasks.scoring import mean_token_nll, sequence_logprobs
from unlearn.training.methods import NPO, RMU, GradAscent, GradDiff, SimNPO, build_method, layer_activations


def batches(tok):
    forget = [encode(tok, e) for e in FORGET]
    retain = [encode(tok, e) for e in RETAIN]
    return forget, retain


def reference_token_logprobs(model, batch):
    """Per-row list of target-token log-probs from the plain full-logits forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    rows = []
    for r in range(labels.shape[0]):
        mask = labels[r] != -100
        rows.append(logp[r, mask].gather(-1, labels[r, mask].unsqueeze(-1)).squeeze(-1))
    return rows


@torch.no_grad()
def test_scoring_matches_full_logits(tiny):
    model, tok = tiny
    forget, _ = batches(tok)
    batch = collate(forget, tok.pad_token_id)
    rows = reference_token_logprobs(model, batch)
    summed, counts = sequence_logprobs(model, batch)
    assert torch.allclose(summed, torch.stack([r.sum() for r in rows]), atol=1e-5)
    assert counts.tolist() == [len(r) for r in rows] == [len(" Zorbu") + 1, len(" the oboe") + 1]
    expected_nll = -torch.cat(rows).mean()
    assert torch.allclose(mean_token_nll(model, batch), expected_nll, atol=1e-5)


@torch.no_grad()
def test_gradascent_and_graddiff(tiny):
    model, tok = tiny
    forget, retain = batches(tok)
    fb, rb = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    nll_f = -torch.cat(reference_token_logprobs(model, fb)).mean()
    nll_r = -torch.cat(reference_token_logprobs(model, rb)).mean()
    assert torch.allclose(GradAscent()(model, fb, rb).total, -nll_f, atol=1e-5)
    loss = GradDiff(gamma=2.0, alpha=0.5)(model, fb, rb)
    assert torch.allclose(loss.total, -2.0 * nll_f + 0.5 * nll_r, atol=1e-5)
    # The named parts are the weighted terms themselves: conflict-aware optimizers differentiate them apart.
    assert torch.allclose(loss.parts["forget"], -2.0 * nll_f, atol=1e-5)
    assert torch.allclose(loss.parts["retain"], 0.5 * nll_r, atol=1e-5)


@torch.no_grad()
def test_npo_starts_at_two_log_two_over_beta(tiny):
    """Before any update pi == pi_ref, so L_f = -(2/beta) log sigmoid(0) = (2/beta) ln 2 exactly."""
    model, tok = tiny
    forget, retain = batches(tok)
    npo = NPO(beta=0.1, gamma=1.0, alpha=0.0)
    npo.prepare(model, forget, retain, tok.pad_token_id, batch_size=8)
    fb, rb = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    assert npo(model, fb, rb).total.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)


@torch.no_grad()
def test_npo_against_formula_with_shifted_reference(tiny):
    model, tok = tiny
    forget, retain = batches(tok)
    fb, rb = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    logp = torch.stack([r.sum() for r in reference_token_logprobs(model, fb)])
    fb["ref_logp"] = logp + torch.tensor([1.0, -3.0])  # pretend the reference was more / less sure
    nll_r = -torch.cat(reference_token_logprobs(model, rb)).mean()
    beta, gamma, alpha = 0.5, 1.5, 0.25
    ratio = torch.tensor([-1.0, 3.0])
    expected = gamma * (-(2 / beta) * F.logsigmoid(-beta * ratio).mean()) + alpha * nll_r
    assert torch.allclose(NPO(beta=beta, gamma=gamma, alpha=alpha)(model, fb, rb).total, expected, atol=1e-4)


@torch.no_grad()
def test_simnpo_against_formula(tiny):
    model, tok = tiny
    forget, retain = batches(tok)
    fb, rb = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    rows = reference_token_logprobs(model, fb)
    beta, delta = 2.0, 0.5
    margins = torch.stack([-(beta / len(r)) * r.sum() - delta for r in rows])
    expected = -(2 / beta) * F.logsigmoid(margins).mean()
    got = SimNPO(beta=beta, delta=delta, gamma=1.0, alpha=0.0)(model, fb, rb).total
    assert torch.allclose(got, expected, atol=1e-5)


@torch.no_grad()
def test_rmu_losses_and_trainable_params(tiny):
    model, tok = tiny
    forget, retain = batches(tok)
    rmu = RMU(layer=2, steering=3.0, alpha=10.0, seed=1)
    rmu.trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    rmu.prepare(model, forget, retain, tok.pad_token_id, batch_size=8)
    fb, rb = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    # Independent path: hidden_states[layer + 1] is the output of decoder layer `layer`.
    hidden = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"],
                   output_hidden_states=True).hidden_states[3]
    assert torch.allclose(layer_activations(model, fb, 2), hidden, atol=1e-6)
    u = torch.rand(32, generator=torch.Generator().manual_seed(1))
    control = 3.0 * u / u.norm()
    mask = fb["attention_mask"].bool()
    expected_forget = ((hidden[mask] - control) ** 2).mean()
    # The model has not moved, so the retain term is exactly zero.
    loss = rmu(model, fb, rb)
    assert torch.allclose(loss.parts["forget"], expected_forget, atol=1e-5)
    assert loss.parts["retain"].item() == 0.0 and torch.allclose(loss.total, expected_forget)


def test_rows_used_are_the_rows_training_draws():
    items = [Encoded([3, 4, 5], 1) for _ in range(10)]
    for steps in (1, 2, 3, 4):
        stream = endless_rows(items, 3, seed=7)
        drawn = {id(item) for _ in range(steps) for item in next(stream)}
        assert {id(items[i]) for i in rows_used(len(items), 3, 7, steps)} == drawn


@torch.no_grad()
def test_rmu_caches_only_what_is_used_and_a_frozen_copy_agrees(tiny):
    model, tok = tiny
    forget, retain = batches(tok)
    cached, copied = RMU(layer=2, steering=3.0, seed=1), RMU(layer=2, steering=3.0, seed=1, frozen_copy=True)
    for rmu in (cached, copied):
        rmu.trainable(model)
    cached.prepare(model, forget, retain, tok.pad_token_id, batch_size=8, retain_used={1})
    copied.prepare(model, forget, retain, tok.pad_token_id, batch_size=8)
    assert sorted(cached.frozen) == [1] and all(t.device.type == "cpu" for t in cached.frozen.values())
    assert copied.frozen == {} and copied.frozen_model is not None
    for p in model.model.layers[2].mlp.down_proj.parameters():
        p.add_(0.05)  # the model moves; the frozen activations must not
    fb, rb = collate(forget, tok.pad_token_id), collate([retain[1]], tok.pad_token_id)
    a, b = cached(model, fb, rb), copied(model, fb, rb)
    assert a.parts["retain"].item() > 0
    assert torch.allclose(a.parts["retain"], b.parts["retain"], rtol=1e-5)


def test_rmu_default_layer_scales_with_depth(tiny):
    model, _ = tiny  # 4 layers: round(7 * 4 / 32) = 1 is too shallow for l-2 .. l
    with pytest.raises(ValueError, match="rmu layer"):
        RMU().trainable(model)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose from: ga, gradascent"):
        build_method("bogus")
    with pytest.raises(ValueError, match="unknown key\\(s\\) in method 'npo': betta "):
        build_method("npo", betta=0.1)


def test_lora_adapters_go_where_the_method_trains(tiny):
    from unlearn.training.adapters import add_lora

    model, _ = tiny
    RMU(layer=2).trainable(model)
    wrapped = add_lora(model, rank=2)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{ab}.default.weight"
                         for i in (0, 1, 2) for ab in "AB"}
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lora(model, rank=0)

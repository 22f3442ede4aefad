"""Every optimizer grade with every unlearning method, through the real training loop, on a tiny model.

Options are each grade's shipped defaults (configs/optimizer/<name>.yaml) with the learning rate raised so
two steps visibly move a tiny random model; the point is that every pairing runs, stays finite and
updates exactly the parameters the method trains.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml

from tests.conftest import FORGET, RETAIN
from unlearn.core.errors import UserError
from unlearn.optim.protocol import OPTIMIZERS, build_optimizer
from unlearn.recipes.pipeline import check_run_config
from unlearn.tasks.data import encode
from unlearn.training.config import CONFIG_DIR, load_run_config
from unlearn.training.loop import train
from unlearn.training.methods import METHODS, RMU, build_method

METHOD_NAMES = ["gradascent", "graddiff", "npo", "simnpo", "rmu", "sam-npo", "rs-npo", "kl-retain", "idkdpo",
                "task-vector"]
LR = {"first-order": 1e-2, "sign": 1e-3, "second-order": 1e-2, "spectral": 2e-2, "zeroth-order": 1e-3}


def options_for(name: str) -> dict[str, Any]:
    options = yaml.safe_load((CONFIG_DIR / "optimizer" / f"{name}.yaml").read_text()) or {}
    grade = OPTIMIZERS[name].grade  # type: ignore[attr-defined]
    if grade == "hybrid":
        options.update(block=1, total_steps=2)
    else:
        options["lr"] = LR[grade]
    return options


def test_every_method_is_covered() -> None:
    assert set(METHOD_NAMES) == set(METHODS)


@pytest.mark.parametrize("method_name", METHOD_NAMES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grade_runs_with_method(tiny, method_name: str, name: str) -> None:
    model, tok = tiny
    method = build_method(method_name, **({"layer": 2} if method_name == "rmu" else {}))
    if method.needs_gradients and not OPTIMIZERS[name].uses_gradients:  # type: ignore[attr-defined]
        with pytest.raises(UserError, match="computes no gradients"):  # refused before any model loads
            check_run_config(load_run_config(method_name, name))
        return
    method.trainable(model)
    forget = method.encode_forget(tok, FORGET, 256)
    retain = [encode(tok, e) for e in RETAIN]
    method.prepare(model, forget, retain, tok.pad_token_id, batch_size=2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(name, model.named_parameters(), **options_for(name))
    result = train(model, method, optimizer, forget, retain, pad_id=tok.pad_token_id, batch_size=2,
                   max_steps=2, seed=0, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained
    if isinstance(method, RMU):
        assert all("mlp.down_proj" in n for n in changed)

"""What `unlearn eval` and `unlearn attack` work on: a run folder (held against replacement while they read and
write it) or any model on a configured benchmark."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from unlearn.attacks.base import Subject
from unlearn.compute.placement import resolve
from unlearn.core.errors import UserError
from unlearn.recipes.attack import subject_from_run
from unlearn.storage.locks import hold
from unlearn.tasks.task import load_task
from unlearn.training.config import load_run_config


def subject_for(run_dir: Path | None, model: str | None, config: Path | None, set_: list[str] | None,
                benchmark: str | None = None, flags: dict[str, object] | None = None, trust_remote_code: bool = False,
                device: str | None = None, dtype: str | None = None) -> Subject:
    """The model under evaluation or attack: a run folder (on its own benchmark, with flags applied on top, in
    the precision it trained in unless --dtype says otherwise), or any model on the configured benchmark."""
    if (run_dir is None) == (model is None):
        raise UserError("give exactly one of --run RUN_DIR or --model MODEL")
    if run_dir is not None:
        if benchmark is not None or any(v is not None for k, v in (flags or {}).items() if k.startswith("bench")):
            raise UserError("a run is evaluated on its own benchmark: --benchmark/--data go with --model")
        return subject_from_run(run_dir, {k: v for k, v in (flags or {}).items() if v is not None},
                                trust_remote_code, device, dtype)
    # Only the benchmark and eval sections matter here.
    cfg = load_run_config(None, None, config, flags or {}, set_, benchmark=benchmark)
    return Subject(model_spec=model, task=load_task(cfg.benchmark), run_dir=None, unlearned=None, target=None,
                   target_model=None, eval_settings=cfg.eval, trust_remote_code=trust_remote_code,
                   placement=resolve(device or "auto", dtype or "auto"))


def held(run_dir: Path | None) -> AbstractContextManager[object]:
    """The run folder held against replacement for a block (eval, attack); nothing to hold for a bare model."""
    if run_dir is None:
        return nullcontext()
    # The lock a writer of this folder takes: beside its name as given (a link's own name, not its target's).
    named = Path(os.path.abspath(run_dir))
    if not named.parent.is_dir():
        return nullcontext()  # a missing folder is reported by the subject check, with nothing created
    return hold(named)

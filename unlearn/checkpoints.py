"""Training checkpoints inside a resumable run's staging folder: `checkpoints/step-N/`.

Each step checkpoint holds what a step-exact continuation needs: the weights being trained (`model.safetensors`,
LoRA wrapper included), the optimizer's state and the RNG states (`state.pt`: tensors and plain containers
only, read back with `weights_only=True`, so no pickled code runs), and the run's own progress
(`progress.json`: request, step, seconds, finished requests). The data stream needs no state of its own: it is
a function of (seed, step). A sequential run (several unlearning requests) also keeps `stage-K/`, the model
request K started from: its objective is prepared on that model (NPO's reference log-probs), not on the
checkpoint's. Each checkpoint is written under a temporary name and renamed into place, and the older ones go
only after that, so a kill at any moment leaves a complete checkpoint once the first exists.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UserError
from unlearn.files import read_json, write_json_atomic
from unlearn.runs import CHECKPOINT_PREFIXES, CHECKPOINTS

STEP_PREFIX, STAGE_PREFIX = CHECKPOINT_PREFIXES


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    progress: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.progress["step"])

    @property
    def stage(self) -> int:
        return int(self.progress.get("stage", 0))


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _write(root: Path, name: str, prefix: str, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer | None, progress: dict[str, Any]) -> Path:
    """root/name, written under a temporary name and renamed into place; then the older `prefix*` ones go."""
    from safetensors.torch import save_model

    root.mkdir(exist_ok=True)
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_states()}, tmp / "state.pt")
    write_json_atomic(tmp / "progress.json", progress)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.iterdir():
        if old.name.startswith(prefix) and old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> Path:
    """checkpoints/step-N after step N (`progress["step"]`) of request `progress["stage"]`."""
    return _write(run_dir / CHECKPOINTS, f"{STEP_PREFIX}{int(progress['step'])}", STEP_PREFIX, model, optimizer,
                  progress)


def save_stage_start(run_dir: Path, model: torch.nn.Module, progress: dict[str, Any]) -> Path:
    """checkpoints/stage-K: the model request K (`progress["stage"]`) starts from, before any of its steps."""
    return _write(run_dir / CHECKPOINTS, f"{STAGE_PREFIX}{int(progress['stage'])}", STAGE_PREFIX, model, None,
                  progress | {"step": 0})


def _newest(run_dir: Path, prefix: str) -> Checkpoint | None:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for folder in root.iterdir():
        number = folder.name.removeprefix(prefix)
        if folder.name.startswith(prefix) and number.isdigit() and (folder / "progress.json").is_file():
            found.append((int(number), folder))
    if not found:
        return None
    folder = max(found)[1]
    progress = read_json(folder / "progress.json")
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int) \
            or not isinstance(progress.get("stage", 0), int):
        raise UserError(f"checkpoint {folder} has a malformed progress.json")
    return Checkpoint(folder, progress)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete step checkpoint (temporary ones are ignored), or None."""
    return _newest(run_dir, STEP_PREFIX)


def stage_start(run_dir: Path) -> Checkpoint | None:
    """The newest request-start model of a sequential run, or None."""
    return _newest(run_dir, STAGE_PREFIX)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    try:
        load_model(model, str(path), device=str(next(model.parameters()).device))
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot resume from {path}: {first}") from None


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and RNG states as they were after step `checkpoint.step`."""
    load_weights(model, checkpoint.folder / "model.safetensors")
    try:
        # On the CPU: the optimizer moves its state to each parameter's device itself, and generator states
        # (zeroth-order seed streams) must stay CPU tensors.
        state = torch.load(checkpoint.folder / "state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot resume from {checkpoint.folder}: {first}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])

"""Training checkpoints inside a resumable run's staging folder: `checkpoints/step-N/`.

Each step checkpoint holds what a step-exact continuation needs: the weights being trained (`model.safetensors`,
LoRA wrapper included), the optimizer's state and the RNG states (`state.pt`: tensors and plain containers
only, read back with `weights_only=True`, so no pickled code runs), and the run's own progress
(`progress.json`: request, step, seconds, finished requests). The data stream needs no state of its own: it is
a function of (seed, step). A sequential run (several unlearning requests) also keeps `stage-K/`, the model
request K started from: its method is prepared on that model (NPO's reference log-probs), not on the
checkpoint's. Each checkpoint is written under a temporary name and renamed into place, and the older ones go
only after that, so a kill at any moment leaves a complete checkpoint once the first exists.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.core.errors import SHOWN_CHARACTERS, UserError, first_line
from unlearn.core.files import read_json, write_json_atomic
from unlearn.storage.records import is_number
from unlearn.storage.runs import CHECKPOINT_PREFIXES, CHECKPOINTS

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
    problem = _progress_problem(progress)
    if problem:
        raise UserError(f"cannot resume from {folder}: its progress.json is malformed ({problem})")
    return Checkpoint(folder, progress)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _progress_problem(progress: dict[str, Any]) -> str:
    """What is wrong with a progress.json read back (it is data from a folder: checked before any use), or ""."""
    for key in ("step", "stage"):
        if (key in progress or key == "step") and not _count(progress.get(key)):
            return f"'{key}' must be a count"
    done = progress.get("done")
    if done is None:
        return ""
    if not isinstance(done, dict):
        return "'done' must be a mapping"
    for key, ok in (("seconds", is_number), ("forward_passes", _count), ("steps", _count), ("eval_seconds", is_number)):
        if not ok(done.get(key)):
            return f"'done.{key}' is missing or not a number"
    stages = done.get("stages")
    if not isinstance(stages, list):
        return "'done.stages' must be a list"
    for stage in stages:
        if not (isinstance(stage, dict) and isinstance(stage.get("metrics"), dict)
                and is_number(stage.get("final_loss"))):
            return "each of 'done.stages' needs its metrics and final_loss"
    return ""


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
    except Exception as err:  # noqa: BLE001 - a file from a folder: a truncated or foreign one may raise anything
        raise UserError(f"cannot resume from {path}: not the weights this run saved ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    line = first_line(err)
    return line if len(line) <= SHOWN_CHARACTERS else line[:SHOWN_CHARACTERS] + "..."


def restore(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and RNG states as they were after step `checkpoint.step`; a checkpoint that is not
    what this toolkit wrote is one line naming the file, and nothing of it is applied past the first bad part."""
    load_weights(model, checkpoint.folder / "model.safetensors")
    path = checkpoint.folder / "state.pt"
    try:
        # weights_only: tensors and plain containers only, so a planted pickle runs nothing. On the CPU: the
        # optimizer moves its state to each parameter's device itself, and generator states (zeroth-order seed
        # streams) must stay CPU tensors.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"cannot resume from {checkpoint.folder}: state.pt is missing") from None
    except Exception as err:  # noqa: BLE001 - garbage, a truncated file or a refused pickle: all one answer
        raise UserError(f"cannot resume from {path}: not a checkpoint this toolkit wrote "
                        f"({type(err).__name__})") from None
    rng = state.get("rng") if isinstance(state, dict) else None
    if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict) and isinstance(rng, dict)
            and _byte_tensor(rng.get("torch"))
            and (rng.get("cuda") is None or (isinstance(rng["cuda"], list) and all(map(_byte_tensor, rng["cuda"]))))):
        raise UserError(f"cannot resume from {path}: it lacks the optimizer state or the random generator states "
                        "this toolkit writes")
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    except Exception as err:  # noqa: BLE001 - a state of another optimizer or model: whatever torch raises
        raise UserError(f"cannot resume from {path}: its state does not fit this run ({_first_line(err)})") from None


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1

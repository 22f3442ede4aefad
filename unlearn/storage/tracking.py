"""Live curves of a run in TensorBoard or Weights & Biases (`report_to`, Hugging Face's name and values).

A tracker mirrors what a run records: every log.jsonl record as it is written (the pipeline hands them over
through the training loop's `on_record`), then the final metrics. log.jsonl stays the record the toolkit reads
back, so no number of a run depends on which tracker watched it, and a tracker never writes outside the run
folder it is given (the staging folder, renamed into place at the end: every tracker is closed before that).

A backend is one small class in TRACKERS; the package it needs is an optional extra (`unlearn-toolkit[NAME]`),
checked by `check_report_to` before any model loads.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unlearn.core.errors import UserError, first_line

DISTRIBUTION = "unlearn-toolkit"  # pyproject's [project] name: what `pip install` takes, extras and all


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a log record by name, sections flattened with '/': loss, lr, parts/forget, eval/forget/mcq_acc,
    optimizer/... The step is where they go, not a value; text (the grade) and non-finite numbers have no curve."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif name != "step" and isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[name] = float(value)
    return out


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A run's settings as dotted keys with plain values: what TensorBoard's hyperparameter table can show."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_settings(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class Tracker:
    """`report_to: none`: the run is recorded in log.jsonl only. Backends override the three methods."""

    package: str | None = None  # the module the backend imports, which is also the name of its extra

    def __init__(self, folder: Path, name: str, config: dict[str, Any]) -> None:
        self.folder, self.name, self.config = folder, name, config

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars at one step."""

    def summary(self, metrics: dict[str, float], step: int) -> None:
        """The final metrics (already logged as `final/...` scalars at `step`): the backend's run summary."""

    def close(self, failed: bool) -> None:
        """Everything on disk and the writer gone: the run folder is renamed (or removed) right after."""


class TensorBoard(Tracker):
    """Event files in `<run>/tensorboard/`, written by torch's SummaryWriter (`tensorboard --logdir` that folder)."""

    package = "tensorboard"
    FOLDER = "tensorboard"

    def __init__(self, folder: Path, name: str, config: dict[str, Any]) -> None:
        super().__init__(folder, name, config)
        self.logdir = folder / self.FOLDER
        self._writer: Any = None

    def _open(self, step: int) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run finds the killed writer's events here: those past the checkpoint are taken again, so
            # they are purged (readers drop every earlier event at or after `purge_step`).
            resumed = self.logdir.is_dir() and any(self.logdir.glob("events.out.tfevents.*"))
            self._writer = SummaryWriter(str(self.logdir), purge_step=step if resumed else None)
        return self._writer

    def log(self, values: dict[str, float], step: int) -> None:
        writer = self._open(step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()  # watchable while it runs, as log.jsonl is (the writer would otherwise wait up to 2 minutes)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self._open(step)
        # The HParams tab: the settings beside the final metrics, which it reads from the `final/...` scalars of
        # this same folder (SummaryWriter.add_hparams would write a second run in a subfolder instead).
        for event in hparams(flat_settings(self.config), {f"final/{k}": v for k, v in scalars(metrics).items()}):
            writer.file_writer.add_summary(event)
        writer.flush()

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandB(Tracker):
    """A Weights & Biases run named after the run folder, its files in `<run>/wandb/`; offline (`wandb sync` later)
    unless WANDB_API_KEY or WANDB_MODE says otherwise."""

    package = "wandb"

    def __init__(self, folder: Path, name: str, config: dict[str, Any]) -> None:
        super().__init__(folder, name, config)
        import wandb

        # No key and no stated mode: offline, rather than wandb asking for a login in the middle of a run.
        offline = not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE")
        try:
            # An absolute folder: wandb hands it to its own service process, which need not share our cwd.
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "unlearn"), name=name,
                                  dir=str(folder.absolute()), config=config, mode="offline" if offline else None)
        except Exception as err:  # noqa: BLE001 - wandb's own errors (login, network): one line, before training
            raise UserError(f"--report-to wandb: wandb.init failed: {first_line(err)}") from err

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(scalars(metrics))

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS: dict[str, type[Tracker]] = {"none": Tracker, "tensorboard": TensorBoard, "wandb": WandB}
REPORT_TO = tuple(TRACKERS)


def check_report_to(report_to: str) -> None:
    """A one-line UserError when the backend's package is not installed: said before any model loads."""
    package = TRACKERS[report_to].package
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {report_to} needs the {package} extra: "
                        f"pip install '{DISTRIBUTION}[{package}]'")


class RunTracker:
    """A run's tracker as the pipeline uses it: log records (their steps shifted past the requests before, so a
    sequential run is one curve), then the final metrics."""

    def __init__(self, backend: Tracker) -> None:
        self.backend = backend

    def record(self, record: Mapping[str, Any], offset: int = 0) -> None:
        self.backend.log(scalars(record), offset + int(record["step"]))

    def final(self, metrics: Mapping[str, Any], step: int) -> None:
        values = scalars(metrics)
        if values:
            self.backend.log({f"final/{k}": v for k, v in values.items()}, step)
        self.backend.summary(values, step)


@contextmanager
def tracking(report_to: str, folder: Path, name: str, config: dict[str, Any]) -> Iterator[RunTracker]:
    """The run's tracker for a block: closed when it ends, however it ends (an error, an interrupt), so the
    folder holds complete files when it is renamed into place and no writer is left writing into a removed one."""
    backend = TRACKERS[report_to](folder, name, config)
    failed = True
    try:
        yield RunTracker(backend)
        failed = False
    finally:
        backend.close(failed)
